// How long the web client takes to show a long history, in Chromium.
// A benchmark, not a test: run it by hand, side by side for two builds.
//
//   node replay-bench.mjs MESSAGES RUNS BINARY [BINARY...]
//
// For each binary (interleaved, RUNS rounds): start it in memory, post
// MESSAGES messages through one WebSocket, then time a fresh page from
// navigation until every message is in the list. Prints the median per
// binary.
import { spawn } from "node:child_process";
import { chromium } from "playwright-core";

const [count = "10000", runs = "3", ...bins] = process.argv.slice(2);
const N = Number(count);

async function start(bin) {
  const child = spawn(bin, [
    "--listen", "127.0.0.1:0", "--in-memory",
    "--message-rate", "1000000", "--history-limit", String(N),
    "--max-refusals", "1000000",
  ], { env: { ...process.env, NO_COLOR: "1" }, stdio: ["ignore", "pipe", "inherit"] });
  const port = await new Promise((resolve, reject) => {
    let seen = "";
    child.stdout.on("data", (c) => {
      seen += c.toString().replace(/\x1b\[[0-9;]*m/g, "");
      const m = seen.match(/listening addr=[^\s]*:(\d+)/);
      if (m) resolve(Number(m[1]));
    });
    child.on("exit", reject);
  });
  return { child, port };
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
});
const times = new Map(bins.map((b) => [b, []]));
for (let round = 0; round < Number(runs); round++) {
  for (const bin of bins) {
    const { child, port } = await start(bin);
    const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
    // Fill the history from a blank page (so no client renders it), then
    // wait for the echoes.
    await page.evaluate(async ([n, port]) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`);
      await new Promise((r) => ws.addEventListener("open", r));
      let echoed = 0;
      const done = new Promise((r) => ws.addEventListener("message", () => ++echoed === n && r()));
      for (let i = 0; i < n; i++) {
        ws.send(JSON.stringify({ type: "send_message", data: { text: `history message ${i}`, author_name: "bench" } }));
      }
      await done;
      ws.close();
    }, [N, port]);
    await page.close();
    const fresh = await browser.newPage({ viewport: { width: 1100, height: 800 } });
    const started = Date.now();
    await fresh.goto(`http://127.0.0.1:${port}/`);
    await fresh.waitForFunction((n) => document.querySelectorAll("#messages li").length === n, N, {
      timeout: 600000,
      polling: 50,
    });
    times.get(bin).push(Date.now() - started);
    await fresh.close();
    child.kill("SIGTERM");
    await new Promise((r) => child.on("exit", r));
  }
}
await browser.close();
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
for (const [bin, xs] of times) {
  console.log(`${bin}: ${N} messages shown in median ${median(xs)} ms (runs: ${xs.join(", ")})`);
}
