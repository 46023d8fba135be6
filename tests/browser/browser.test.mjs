// The web client in a real browser: Debian's chromium driven by
// playwright-core (which never downloads a browser of its own).
//
// Two pages talk through one server as two different users. Both connect
// from 127.0.0.1, so the server runs as if behind a reverse proxy on
// loopback (--trusted-proxy 127.0.0.0/8), and each page loads through a
// small proxy of its own (`forwarder`) that sets its X-Forwarded-For on
// every request: page loads, fetches and WebSocket handshakes alike.
// (Chromium 148 no longer sends a context's extra headers on WebSocket
// handshakes, so they cannot carry the address.) Run through
// tests/browser/run.sh, which builds the server and sets CHAT_SERVER_BIN
// and SCREENSHOT_DIR.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer, request as httpRequest } from "node:http";
import { createServer as createTcpServer, connect as tcpConnect } from "node:net";
import { mkdtempSync, mkdirSync, rmSync, createWriteStream, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { chromium } from "playwright-core";

const BIN = resolve(process.env.CHAT_SERVER_BIN ?? "../../target/debug/chat-server");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SHOTS = resolve(process.env.SCREENSHOT_DIR ?? "../../target/browser-screenshots");
const MESSAGE_RATE = 20;
const RATE_TEXT = `Rate limit exceeded. Maximum ${MESSAGE_RATE} messages per minute.`;

const dataDir = mkdtempSync(join(tmpdir(), "chat-browser-"));
const logPath = join(dataDir, "server.log");
const log = createWriteStream(logPath, { flags: "a" });
let server = null;
let port = 0;
let browser = null;
let a = null; // page of user A
let b = null; // page of user B
const ADDR_A = "198.51.100.1";
const ADDR_B = "198.51.100.2";
const ADDR_MOD = "198.51.100.3";
// The operator key of the moderator's page (the server reads it from a
// keys file in the data directory).
const MOD_KEY = "a-moderator-key-for-the-browser-test";
const keysFile = join(dataDir, "admin-keys");
writeFileSync(keysFile, `carol ${MOD_KEY}\n`, { mode: 0o600 });

/** Starts the server (on `port` when set, else any free port). */
async function startServer(extra = []) {
  ({ child: server, port } = await launch([
    ...extra,
    "--listen", `0.0.0.0:${port}`,
    "--data-dir", dataDir,
    "--identity-secret", "a secret for the browser test",
    "--message-rate", String(MESSAGE_RATE),
    "--trusted-proxy", "127.0.0.0/8",
    "--shutdown-grace", "2s",
    "--admin-keys-file", keysFile,
  ]));
}

/** Spawns a server with `args` and waits until it listens. */
async function launch(args) {
  const child = spawn(BIN, args, {
    env: { ...process.env, RUST_LOG: "info", NO_COLOR: "1" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stderr.pipe(log, { end: false });
  const listening = new Promise((resolveAddr, reject) => {
    let seen = "";
    child.stdout.on("data", (chunk) => {
      log.write(chunk);
      seen += chunk.toString();
      // Strip colours, whatever the subscriber decided.
      const plain = seen.replace(/\x1b\[[0-9;]*m/g, "");
      const m = plain.match(/listening addr=[^\s]*:(\d+)/);
      if (m) resolveAddr(Number(m[1]));
    });
    child.on("exit", (code) => reject(new Error(`server exited with ${code}; see ${logPath}`)));
  });
  return { child, port: await withTimeout(listening, 15000, "server start") };
}

async function stopServer() {
  const child = server;
  server = null;
  const exited = new Promise((r) => child.on("exit", r));
  child.kill("SIGTERM");
  await withTimeout(exited, 10000, "server stop");
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result in ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Retries an assertion until it holds or `ms` pass. */
async function eventually(check, ms = 10000) {
  const until = Date.now() + ms;
  for (;;) {
    try {
      return await check();
    } catch (e) {
      if (Date.now() > until) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/** The proxies in front of the server, closed at the end. */
const forwarders = [];

/**
 * A reverse proxy in front of the server for the user at `addr`: every
 * request through it, plain or a WebSocket handshake, reaches the server
 * with `X-Forwarded-For: addr` (and its Host unchanged). Its port.
 */
async function forwarder(addr, target = () => port) {
  const head = (req) => {
    const lines = [`${req.method} ${req.url} HTTP/${req.httpVersion}`];
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      if (req.rawHeaders[i].toLowerCase() !== "x-forwarded-for") {
        lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      }
    }
    lines.push(`X-Forwarded-For: ${addr}`);
    return lines.join("\r\n") + "\r\n\r\n";
  };
  const proxy = createServer((req, res) => {
    const headers = { ...req.headers, "x-forwarded-for": addr };
    const up = httpRequest(
      { host: "127.0.0.1", port: target(), method: req.method, path: req.url, headers },
      (answer) => {
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
      },
    );
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  proxy.on("upgrade", (req, down, rest) => {
    const up = tcpConnect(target(), "127.0.0.1", () => {
      up.write(head(req));
      if (rest.length) up.write(rest);
      up.pipe(down);
      down.pipe(up);
    });
    for (const [from, to] of [[down, up], [up, down]]) {
      from.on("error", () => to.destroy());
      from.on("close", () => to.destroy());
    }
  });
  await new Promise((r) => proxy.listen(0, "127.0.0.1", r));
  forwarders.push(proxy);
  return proxy.address().port;
}

/** A page in a fresh browser context for the user at `addr`. */
async function open(addr, options = {}) {
  const { path: _path, ...contextOptions } = options;
  const context = await browser.newContext({
    viewport: { width: 1100, height: 700 },
    ...contextOptions,
  });
  const page = await context.newPage();
  page.on("pageerror", (e) => assert.fail(`page error for ${addr}: ${e.message}`));
  await page.goto(`http://127.0.0.1:${await forwarder(addr)}${options.path ?? "/"}`);
  await connected(page);
  return page;
}

async function connected(page) {
  await page.locator('#status[data-state="open"]').waitFor({ timeout: 15000 });
}

async function send(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

/** The message element with exactly this text. */
function message(page, text) {
  return page.locator("li.msg").filter({
    has: page.locator("p.text").getByText(text, { exact: true }),
  });
}

/** `[count, pressed]` of an emoji's chip on a message, `[0, false]` if none. */
async function chip(page, text, emoji) {
  const c = message(page, text).locator(`.reaction[data-emoji="${emoji}"]`);
  if ((await c.count()) === 0) return [0, false];
  return [Number(await c.locator(".count").textContent()), (await c.getAttribute("aria-pressed")) === "true"];
}

async function ids(page) {
  return page.locator("li.msg").evaluateAll((els) => els.map((e) => e.dataset.id));
}

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Playwright adds --headless and a fresh temporary --user-data-dir
    // itself (it refuses one in args).
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  a = await open(ADDR_A);
  b = await open(ADDR_B);
});

after(async () => {
  await browser?.close();
  for (const proxy of forwarders) proxy.close();
  if (server) await stopServer();
  log.end();
  if (!process.exitCode) rmSync(dataDir, { recursive: true, force: true });
});

test("a message sent from one page appears in the other", async () => {
  await a.fill("#name", "Alice");
  await b.fill("#name", "Bob");
  // Let B's (empty) history replay settle, so what follows is live.
  await b.waitForTimeout(500);
  await send(a, "hello from A");
  const seen = message(b, "hello from A");
  await seen.waitFor();
  assert.equal(await seen.locator(".author").textContent(), "Alice");
  assert.equal(await seen.evaluate((el) => el.classList.contains("own")), false);
  // Screen readers hear live messages from others.
  await eventually(async () => assert.equal(await b.textContent("#announcer"), "Alice: hello from A"));
  const own = message(a, "hello from A");
  await own.waitFor();
  assert.equal(await own.evaluate((el) => el.classList.contains("own")), true, "A's own message is marked");
  assert.match(await own.locator(".author").textContent(), /Alice \(you\)/);
  assert.equal(await own.locator("time").textContent(), "just now");
  assert.equal(await a.inputValue("#text"), "", "the box is cleared after sending");

  // Shift+Enter is a new line, not a send.
  await a.fill("#text", "first line");
  await a.press("#text", "Shift+Enter");
  await a.locator("#text").pressSequentially("second line");
  assert.equal(await a.inputValue("#text"), "first line\nsecond line");
  await a.press("#text", "Enter");
  await message(b, "first line\nsecond line").waitFor();

  // The name survives a reload.
  await a.reload();
  await connected(a);
  assert.equal(await a.inputValue("#name"), "Alice");
  await message(a, "hello from A").waitFor();
});

test("reactions toggle, count, and highlight the user's own", async () => {
  const text = "hello from A";
  // B picks 👍 from the picker.
  await message(b, text).locator(".add-reaction").click();
  assert.equal(await message(b, text).locator(".add-reaction").getAttribute("aria-expanded"), "true");
  await b.locator("#picker button", { hasText: "👍" }).click();
  await eventually(async () => assert.deepEqual(await chip(b, text, "👍"), [1, true]));
  await eventually(async () => assert.deepEqual(await chip(a, text, "👍"), [1, false]));

  // A joins in by clicking the chip: two reactions, each page highlights its own.
  await message(a, text).locator('.reaction[data-emoji="👍"]').click();
  await eventually(async () => assert.deepEqual(await chip(a, text, "👍"), [2, true]));
  await eventually(async () => assert.deepEqual(await chip(b, text, "👍"), [2, true]));

  // And toggles it off again.
  await message(a, text).locator('.reaction[data-emoji="👍"]').click();
  await eventually(async () => assert.deepEqual(await chip(a, text, "👍"), [1, false]));
  await eventually(async () => assert.deepEqual(await chip(b, text, "👍"), [1, true]));

  // The picker works from the keyboard: open, arrow to ❤️, Enter, Escape-free close.
  await message(a, text).locator(".add-reaction").focus();
  await a.keyboard.press("Enter");
  await a.keyboard.press("ArrowRight");
  await a.keyboard.press("Enter");
  await eventually(async () => assert.deepEqual(await chip(b, text, "❤️"), [1, false]));
  await eventually(async () => assert.deepEqual(await chip(a, text, "❤️"), [1, true]));
  assert.equal(await a.locator("#picker").isHidden(), true, "the picker closes after a pick");
});

test("text from the network is shown as text, never as HTML", async () => {
  const attack = `<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>`;
  await b.fill("#name", "<b>Mallory</b>");
  await send(b, attack);
  for (const page of [a, b]) {
    const m = message(page, attack);
    await m.waitFor();
    assert.equal(await m.locator("p.text").textContent(), attack);
    assert.match(await m.locator(".author").textContent(), /^<b>Mallory<\/b>/);
    assert.equal(await page.locator("#messages img, #messages script, #messages b").count(), 0);
    assert.equal(await page.evaluate(() => window.__xss), undefined);
  }
  await b.fill("#name", "Bob");
});

test("the counter counts characters as the server does, and blocks an over-long message", async () => {
  await a.fill("#text", "😀".repeat(250));
  assert.equal(await a.textContent("#counter"), "250 / 500");
  assert.equal(await a.isEnabled("#send"), true);
  await a.fill("#text", "x".repeat(501));
  assert.equal(await a.textContent("#counter"), "501 / 500");
  assert.equal(await a.getAttribute("#text", "aria-invalid"), "true");
  assert.equal(await a.isDisabled("#send"), true);
  await a.fill("#text", "");
  assert.equal(await a.isDisabled("#send"), true, "nothing to send");
});

test("screenshots at desktop and phone widths, light and dark", async () => {
  const shots = [
    ["desktop.png", { width: 1280, height: 800 }, "light"],
    ["desktop-dark.png", { width: 1280, height: 800 }, "dark"],
    ["phone.png", { width: 390, height: 844 }, "light"],
  ];
  for (const [file, viewport, colorScheme] of shots) {
    // As user A, so A's own messages and reactions show highlighted.
    const page = await open(ADDR_A, {
      viewport,
      colorScheme,
      deviceScaleFactor: viewport.width < 500 ? 2 : 1,
    });
    await message(page, "hello from A").waitFor();
    await page.fill("#name", "Alice");
    await page.fill("#text", "Typing a reply…");
    await page.waitForTimeout(500); // let the replay settle
    if (viewport.width < 500) {
      // Nothing wider than the phone: no sideways scrolling.
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert.ok(overflow <= 0, `page is ${overflow}px wider than the phone`);
    }
    await page.screenshot({ path: join(SHOTS, file) });
    await page.context().close();
  }
});

test("the view sticks to the bottom unless the reader scrolled up", async () => {
  await b.setViewportSize({ width: 700, height: 420 });
  for (let i = 1; i <= 8; i++) await send(a, `filler ${i}\nwith a second line`);
  await message(b, "filler 8\nwith a second line").waitFor();
  const gap = (page) =>
    page.evaluate(() => {
      const s = document.getElementById("scroller");
      return s.scrollHeight - s.scrollTop - s.clientHeight;
    });
  assert.ok((await gap(b)) > -1 && (await gap(b)) < 2, "following the bottom");
  assert.ok(await b.evaluate(() => document.getElementById("scroller").scrollHeight > 600), "the list overflows");

  await b.evaluate(() => (document.getElementById("scroller").scrollTop = 0));
  await send(a, "while B reads old messages");
  await message(b, "while B reads old messages").waitFor();
  assert.equal(await b.evaluate(() => document.getElementById("scroller").scrollTop), 0, "not yanked down");
  await b.locator("#jump").waitFor();
  await b.click("#jump");
  await eventually(async () => assert.ok((await gap(b)) < 2));
  assert.equal(await b.locator("#jump").isHidden(), true);
  await b.setViewportSize({ width: 1100, height: 700 });
});

test("a refused message shows a notice and gives the text back", async () => {
  // A has sent 11 messages in this window; keep going until the limit.
  let notice = a.locator(".notice", { hasText: RATE_TEXT });
  for (let i = 0; i < MESSAGE_RATE + 2 && (await notice.count()) === 0; i++) {
    await send(a, `burst ${i}`);
    await a.waitForTimeout(30);
  }
  await notice.first().waitFor();
  assert.equal(await notice.first().getAttribute("role"), "alert");
  await eventually(async () => assert.match(await a.inputValue("#text"), /^burst \d+$/), 5000);
  // Non-blocking: the page still works while the notice shows.
  await b.fill("#text", "B is not limited");
  await b.press("#text", "Enter");
  await message(a, "B is not limited").waitFor();
  notice = a.locator(".notice").first();
  await notice.locator("button").click();
  await eventually(async () => assert.equal(await a.locator(".notice", { hasText: RATE_TEXT }).count(), 0));
  await a.fill("#text", "");
});

test("the server's other endpoints answer", async () => {
  const get = (path) => fetch(`http://127.0.0.1:${port}${path}`);
  assert.equal(await (await get("/healthz")).text(), "ok\n");
  const who = await (await fetch(`http://127.0.0.1:${port}/whoami`, {
    headers: { "X-Forwarded-For": ADDR_B },
  })).json();
  const mine = await b.evaluate(() => fetch("/whoami").then((r) => r.json()));
  assert.equal(who.user_id, mine.user_id, "same address, same id");
  const author = await message(b, "B is not limited").getAttribute("data-author");
  assert.equal(author, who.user_id, "B's messages carry B's id");
  const metrics = await (await get("/metrics")).text();
  assert.match(metrics, /^chat_messages_accepted_total \d+$/m);
  assert.match(metrics, /^chat_frames_refused_total\{reason="rate_limited"\} [1-9]/m);
  assert.equal((await get("/nope")).status, 404);
});

test("a page from another site cannot open the chat as its visitor", async () => {
  // Another origin (same host, another port) whose page tries the chat's
  // WebSocket from the visitor's browser.
  const other = createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
    res.end(`<!doctype html><title>waiting</title><script>
      const ws = new WebSocket("ws://127.0.0.1:${port}/ws");
      ws.onopen = () => { document.title = "opened"; };
      ws.onclose = () => { if (document.title === "waiting") document.title = "refused"; };
    </script>`);
  });
  await new Promise((r) => other.listen(0, "127.0.0.1", r));
  const context = await browser.newContext({ extraHTTPHeaders: { "X-Forwarded-For": ADDR_A } });
  try {
    const page = await context.newPage();
    await page.goto(`http://127.0.0.1:${other.address().port}/`);
    await eventually(async () => assert.equal(await page.title(), "refused"));
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    assert.match(metrics, /^chat_handshakes_refused_total\{reason="origin_not_allowed"\} [1-9]/m);
  } finally {
    await context.close();
    other.close();
  }
});

test("browsers sharing one address load the page in turn (a NAT)", async () => {
  // No trusted proxy here: every page really comes from 127.0.0.1, one
  // address, which may hold only 4 connections in their request phase.
  // Each loaded page leaves idle keep-alive connections behind; they must
  // make room for the next browser's.
  const nat = await launch(["--listen", "127.0.0.1:0", "--in-memory", "--max-pending-per-ip", "4"]);
  const contexts = [];
  try {
    for (let i = 0; i < 8; i++) {
      const context = await browser.newContext();
      contexts.push(context);
      const page = await context.newPage();
      page.on("pageerror", (e) => assert.fail(`page error in browser ${i}: ${e.message}`));
      const failed = [];
      page.on("requestfailed", (r) => failed.push(r.url()));
      await page.goto(`http://127.0.0.1:${nat.port}/`);
      await connected(page);
      assert.deepEqual(failed, [], `browser ${i} loaded everything`);
      assert.ok(await page.evaluate(() => document.styleSheets[0].cssRules.length > 0), "styled");
    }
    const metrics = await (await fetch(`http://127.0.0.1:${nat.port}/metrics`)).text();
    assert.match(metrics, /^chat_http_idle_evicted_total [1-9]/m, "idle connections made room");
    assert.match(metrics, /^chat_connections_open 8$/m, "every browser is connected");
  } finally {
    for (const context of contexts) await context.close();
    const exited = new Promise((r) => nat.child.on("exit", r));
    nat.child.kill("SIGTERM");
    await withTimeout(exited, 10000, "server stop");
  }
});

/**
 * A TCP relay in front of the server that the test can cut: `cut()` drops
 * every connection through it and refuses new ones until `restore()`.
 */
async function relay(target = () => port) {
  const open = new Set();
  let refusing = false;
  const tcp = createTcpServer((down) => {
    if (refusing) return down.destroy();
    const up = tcpConnect(target(), "127.0.0.1");
    for (const [from, to] of [[down, up], [up, down]]) {
      from.on("error", () => to.destroy());
      from.on("close", () => to.destroy());
      from.pipe(to);
    }
    open.add(down).add(up);
    down.on("close", () => {
      open.delete(down);
      open.delete(up);
    });
  });
  await new Promise((r) => tcp.listen(0, "127.0.0.1", r));
  return {
    port: tcp.address().port,
    cut() {
      refusing = true;
      for (const s of open) s.destroy();
    },
    restore() {
      refusing = false;
    },
    close() {
      tcp.close();
      for (const s of open) s.destroy();
    },
  };
}

test("a page that lost its connection fetches only what it missed, once, in order", async () => {
  // The page → a line the test can cut → its own forwarder → the server.
  const through = await forwarder("198.51.100.30");
  const line = await relay(() => through);
  // Every WebSocket the page opens, and the frame types each received.
  const spy = `
    window.__sockets = [];
    const Native = window.WebSocket;
    window.WebSocket = function (url, protocols) {
      const ws = new Native(url, protocols);
      const seen = { url, types: [] };
      window.__sockets.push(seen);
      ws.addEventListener("message", (e) => seen.types.push(JSON.parse(e.data).type));
      return ws;
    };
    window.WebSocket.prototype = Native.prototype;
    Object.assign(window.WebSocket, Native);
  `;
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  await context.addInitScript(spy);
  const away = await context.newPage();
  away.on("pageerror", (e) => assert.fail(`page error: ${e.message}`));
  await away.goto(`http://127.0.0.1:${line.port}/`);
  await connected(away);
  const sender = await open("198.51.100.31");
  await eventually(async () => assert.deepEqual(await ids(away), await ids(sender)));

  // The connection dies (a network blip, a phone asleep) and stays down.
  line.cut();
  await away.locator('#status[data-state="closed"]').waitFor();

  // Meanwhile: new messages, a reaction on one of them and one on an
  // older message.
  for (const text of ["while away 1", "while away 2", "while away 3"]) await send(sender, text);
  await message(sender, "while away 3").waitFor();
  for (const [text, emoji] of [["while away 2", "👍"], ["hello from A", "🎉"]]) {
    await message(sender, text).locator(".add-reaction").click();
    await sender.locator("#picker button", { hasText: emoji }).click();
    await eventually(async () => assert.deepEqual(await chip(sender, text, emoji), [1, true]));
  }

  line.restore();
  await connected(away);
  await message(away, "while away 3").waitFor();
  await eventually(async () => assert.deepEqual(await chip(away, "hello from A", "🎉"), [1, false]));
  assert.deepEqual(await ids(away), await ids(sender), "each message once, in order");
  assert.deepEqual(await chip(away, "while away 2", "👍"), [1, false]);

  // It resumed: it asked for what followed its last position and got just
  // that (three messages, two reaction updates), not the whole history.
  const sockets = await away.evaluate(() => window.__sockets);
  assert.ok(sockets.length >= 2);
  assert.match(sockets[0].url, /\/ws\?sync$/);
  const resumed = sockets[sockets.length - 1];
  assert.match(resumed.url, /\/ws\?since=\d+&epoch=[0-9a-f-]{36}$/);
  assert.ok(!resumed.types.includes("reset"), `no reset: ${resumed.types}`);
  assert.equal(resumed.types.filter((t) => t === "message").length, 3, `${resumed.types}`);
  assert.equal(resumed.types.filter((t) => t === "reaction_updated").length, 2, `${resumed.types}`);
  assert.equal(resumed.types[5], "sync");
  await context.close();
  await sender.context().close();
  line.close();
});

test("after a server restart the page reconnects with the same history and no duplicates", async () => {
  const before = await ids(b);
  assert.ok(before.length > 10);
  assert.equal(new Set(before).size, before.length);
  await stopServer();
  await b.locator('#status[data-state="closed"]').waitFor();
  assert.match(await b.textContent("#status-text"), /restarting|Disconnected/);
  assert.equal(await b.isDisabled("#send"), true, "no sending while disconnected");

  await startServer();
  await connected(a);
  await connected(b);
  for (const page of [a, b]) {
    // Wait out the replay, then compare.
    await eventually(async () => assert.deepEqual(await ids(page), before));
    await page.waitForTimeout(600);
    assert.deepEqual(await ids(page), before, "same messages, same order, once each");
  }
  // Reactions and own-highlighting came back too.
  assert.deepEqual(await chip(a, "hello from A", "👍"), [1, false]);
  assert.deepEqual(await chip(b, "hello from A", "👍"), [1, true]);
  // And the live stream works on the new connection.
  await send(b, "after the restart");
  await message(a, "after the restart").waitFor();
  assert.equal(await message(a, "after the restart").count(), 1);
});

test("the list is rebuilt from the replay: messages the server dropped leave it", async () => {
  const before = await ids(a);
  const keep = 5;
  // Restarted with a smaller history, the server drops the oldest messages.
  await stopServer();
  await a.locator('#status[data-state="closed"]').waitFor();
  await startServer(["--history-limit", String(keep)]);
  await connected(a);
  await eventually(async () => assert.deepEqual(await ids(a), before.slice(-keep)));
  assert.equal(await a.locator("#empty").isHidden(), true);
});


// ---- against a scripted server ---------------------------------------------
// The page and /whoami come from the real server; the WebSocket is answered
// by the test (Playwright's routeWebSocket), so it can send exactly the
// frames, in exactly the order, a case needs.

/** A message frame's payload. */
function mockMessage(id, text) {
  return {
    id,
    text,
    author_id: "0000000000000000",
    author_name: "Scripted",
    created_at: Math.floor(Date.now() / 1000),
    reactions: {},
  };
}

/** A page whose WebSocket is `script(route, attempt)`'s to answer. */
async function scripted(addr, script, init = null) {
  const context = await browser.newContext({ extraHTTPHeaders: { "X-Forwarded-For": addr } });
  if (init) await context.addInitScript(init);
  const page = await context.newPage();
  page.on("pageerror", (e) => assert.fail(`page error: ${e.message}`));
  let attempt = 0;
  await page.routeWebSocket(/\/ws(\?|$)/, (route) => script(route, attempt++));
  await page.goto(`http://127.0.0.1:${port}/`);
  return page;
}

test("only a refused message gives its text back, not a refused reaction", async () => {
  const id = crypto.randomUUID();
  const received = [];
  let route = null;
  const page = await scripted("198.51.100.20", (r) => {
    route = r;
    r.send(JSON.stringify({ type: "message", data: mockMessage(id, "react to me") }));
    r.onMessage((m) => received.push(JSON.parse(m)));
  });
  await message(page, "react to me").waitFor();
  // A message goes out and waits (its commit is slow, say)...
  await send(page, "keep me");
  // ...and meanwhile a reaction goes out and is refused.
  await message(page, "react to me").locator(".add-reaction").click();
  await page.locator("#picker button", { hasText: "👍" }).click();
  await eventually(async () => assert.deepEqual(received.map((f) => f.type), ["send_message", "add_reaction"]));
  route.send(JSON.stringify({ type: "error", data: { error: "too many users reacted with this emoji (max 100)" } }));
  await page.locator(".notice", { hasText: "too many users reacted" }).waitFor();
  await page.waitForTimeout(200);
  assert.equal(await page.inputValue("#text"), "", "a refused reaction gives no text back");
  // Then the message itself is refused: its text comes back.
  route.send(JSON.stringify({ type: "error", data: { error: RATE_TEXT } }));
  await eventually(async () => assert.equal(await page.inputValue("#text"), "keep me"));
  await page.context().close();
});

test("a reaction_updated for a message the page does not hold adds nothing", async () => {
  const held = crypto.randomUUID();
  const unknown = crypto.randomUUID();
  let route = null;
  const page = await scripted("198.51.100.21", (r) => {
    route = r;
    r.send(JSON.stringify({ type: "message", data: mockMessage(held, "the only one") }));
  });
  await message(page, "the only one").waitFor();
  const gone = mockMessage(unknown, "dropped long ago");
  gone.reactions = { "👍": ["0000000000000001"] };
  route.send(JSON.stringify({
    type: "reaction_updated",
    data: { message_id: unknown, emoji: "👍", user_id: "0000000000000001", action: "added", message: gone },
  }));
  // A later frame shows the first one was handled.
  route.send(JSON.stringify({ type: "message", data: mockMessage(crypto.randomUUID(), "next") }));
  await message(page, "next").waitFor();
  assert.deepEqual(await ids(page), [held, (await ids(page))[1]]);
  assert.equal(await message(page, "dropped long ago").count(), 0);
  await page.context().close();
});

test("after a 1013 pages reconnect at spread-out times, not all at once", async () => {
  /** How long after a 1013 the page with this `Math.random` reconnects. */
  async function delayAfter1013(random, addr) {
    const attempts = [];
    const page = await scripted(
      addr,
      (r, attempt) => {
        attempts.push(Date.now());
        if (attempt === 0) setTimeout(() => r.close({ code: 1013, reason: "too slow, reconnect" }), 200);
      },
      `Math.random = () => ${random};`,
    );
    await eventually(async () => assert.equal(attempts.length, 2));
    await page.context().close();
    return attempts[1] - attempts[0] - 200;
  }
  const early = await delayAfter1013(0, "198.51.100.22");
  const late = await delayAfter1013(0.999, "198.51.100.23");
  assert.ok(late - early > 150, `reconnect delays ${early} ms and ${late} ms: no jitter`);
});

test("a moderator removes a message and times its author out; the author's page shows both", async () => {
  const mod = await open(ADDR_MOD, { path: "/?moderate", viewport: { width: 1280, height: 800 } });
  await mod.locator("#moderator").waitFor();
  await mod.fill("#moderator-key", MOD_KEY);
  await mod.click("#moderator-use");
  await mod.locator("body.moderating").waitFor();
  // The key is kept for this tab only: not in a cookie, not in the URL.
  assert.equal(await mod.evaluate(() => sessionStorage.getItem("chat.moderatorKey")), MOD_KEY);
  assert.equal(await mod.evaluate(() => document.cookie), "");
  assert.ok(!mod.url().includes(MOD_KEY));
  // A user's page has no moderator's tools.
  assert.equal(await b.locator(".mod-tools").count(), 0);

  await b.fill("#name", "Bob");
  await send(b, "buy cheap pills at example.com");
  await message(mod, "buy cheap pills at example.com").waitFor();
  await message(a, "buy cheap pills at example.com").waitFor();
  await mod.screenshot({ path: join(SHOTS, "moderator.png") });
  await message(mod, "buy cheap pills at example.com").locator(".mod-remove").click();
  // Gone live, from every page (each connects with ?sync).
  for (const page of [mod, a, b]) {
    await eventually(async () => assert.equal(await message(page, "buy cheap pills at example.com").count(), 0));
  }

  await send(b, "and again");
  await message(mod, "and again").waitFor();
  await message(mod, "and again").locator(".mod-timeout").click();
  // The author's page says so, with when it ends.
  await b.locator("#restricted").waitFor();
  assert.match(await b.textContent("#restricted"), /^A moderator timed you out until .+\.$/);
  await send(b, "am I muted?");
  await b.locator(".notice p", { hasText: /^You are timed out until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\.$/ }).waitFor();
  await eventually(async () => assert.equal(await b.inputValue("#text"), "am I muted?", "the refused text is given back"));
  await b.screenshot({ path: join(SHOTS, "timed-out.png") });

  // Lifted: the notice goes, and the user posts again.
  const lifted = await fetch(`http://127.0.0.1:${port}/admin/lift_restriction`, {
    method: "POST",
    headers: { Authorization: `Bearer ${MOD_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ user_id: await b.evaluate(async () => (await (await fetch("/whoami")).json()).user_id) }),
  });
  assert.equal(lifted.status, 200, await lifted.text());
  await eventually(async () => assert.equal(await b.isHidden("#restricted"), true));
  await b.fill("#text", "");
  await send(b, "thanks");
  await message(a, "thanks").waitFor();
  await mod.context().close();
});
