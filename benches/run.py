#!/usr/bin/env python3
"""Runs the published benchmarks: every scenario of chat-loadgen against our
server and the Node.js `ws` peer, side by side in one session, several runs
each, and prints the medians as a Markdown table.

    python3 benches/run.py                # 3 runs of everything
    python3 benches/run.py --runs 5 --only fanout,saturate
    python3 benches/run.py --quick        # small, for a smoke test
    python3 benches/run.py --only sweep   # the fan-out sweep (one run, minutes)
    python3 benches/run.py --only reconnect   # resume with ?since= against a full replay
    CHAT_BASELINE_BIN=/tmp/before/chat-server python3 benches/run.py \
        --servers chat-server,chat-server-baseline --only fanout,saturate   # before and after a change

The reaction storm and the soak have their own commands, given with their
tables in BENCHMARKS.md.

Each run starts the server afresh (empty history). Both servers are started
with their per-address rate limits raised, because the load comes from a few
hundred loopback addresses; the output says so.
"""
import argparse
import json
import os
import signal
import socket
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "target" / "release"
NODE_PEER = ROOT / "benches" / "peers" / "node-ws"
BUN_PEER = ROOT / "benches" / "peers" / "bun"
RESULTS = ROOT / "benches" / "results"

OUR_FLAGS = ["--message-rate", "1000000", "--reaction-rate", "1000000",
             "--max-connections-per-ip", "1000", "--max-connections", "20000"]
OUR_NOTE = "--message-rate 1000000 --reaction-rate 1000000 --max-connections-per-ip 1000"

SERVERS = {
    # In memory, like the peer: the like-for-like comparison.
    "chat-server": {
        "cmd": [str(TARGET / "chat-server"), "--listen", "127.0.0.1:{port}", "--in-memory"] + OUR_FLAGS,
        "env": {"RUST_LOG": "warn"},
        "note": OUR_NOTE + " --in-memory",
    },
    # The same on two threads (--threads 2; the default is one event loop,
    # like Bun's).
    "chat-server-2t": {
        "cmd": [str(TARGET / "chat-server"), "--listen", "127.0.0.1:{port}", "--in-memory", "--threads", "2"] + OUR_FLAGS,
        "env": {"RUST_LOG": "warn"},
        "note": OUR_NOTE + " --in-memory --threads 2",
    },
    # The default: every message committed (fsync) before it is broadcast.
    "chat-server-durable": {
        "cmd": [str(TARGET / "chat-server"), "--listen", "127.0.0.1:{port}", "--data-dir", "{datadir}"] + OUR_FLAGS,
        "env": {"RUST_LOG": "warn"},
        "note": OUR_NOTE + " --data-dir (durable, the default)",
    },
    # Durable on two threads: does the committer (which also fans out to
    # parked sockets) contend with a second worker for two cores?
    "chat-server-durable-2t": {
        "cmd": [str(TARGET / "chat-server"), "--listen", "127.0.0.1:{port}", "--data-dir", "{datadir}", "--threads", "2"] + OUR_FLAGS,
        "env": {"RUST_LOG": "warn"},
        "note": OUR_NOTE + " --data-dir (durable) --threads 2",
    },
    # Cluster mode (issue 13): one node on a nats-server of its own (JetStream,
    # a fresh store per run), in memory. The node's CPU is the server's; the
    # nats-server's is reported beside it (cpu_cores.nats).
    "chat-server-cluster": {
        "cmd": [str(TARGET / "chat-server"), "--listen", "127.0.0.1:{port}", "--in-memory",
                "--cluster", "{nats_urls}", "--identity", "raw-ip"] + OUR_FLAGS,
        "env": {"RUST_LOG": "warn"},
        "note": OUR_NOTE + " --in-memory --identity raw-ip --cluster (one node, nats-server -js)",
        "nats": True,
    },
    # The same on a nats-server that fsyncs every entry before it
    # acknowledges it (jetstream { sync_interval: always }): the cost of a
    # power-loss-proof R1 stream.
    "chat-server-cluster-sync": {
        "cmd": [str(TARGET / "chat-server"), "--listen", "127.0.0.1:{port}", "--in-memory",
                "--cluster", "{nats_urls}", "--identity", "raw-ip"] + OUR_FLAGS,
        "env": {"RUST_LOG": "warn"},
        "note": OUR_NOTE + " --in-memory --identity raw-ip --cluster (one node, nats-server -js, sync_interval: always)",
        "nats": "sync-always",
    },
    # Three nodes on one nats-server: the load on the first, the other two
    # apply every entry too (their CPU is reported as peer_cpu_cores).
    "chat-server-cluster3": {
        "cmd": [str(TARGET / "chat-server"), "--listen", "127.0.0.1:{port}", "--in-memory",
                "--cluster", "{nats_urls}", "--identity", "raw-ip"] + OUR_FLAGS,
        "env": {"RUST_LOG": "warn"},
        "note": OUR_NOTE + " --in-memory --identity raw-ip --cluster (three nodes, the load on one, nats-server -js)",
        "nats": True,
        "peers": 2,
    },
    # The baseline build in cluster mode (CHAT_BASELINE_BIN), one node.
    "chat-server-cluster-baseline": {
        "cmd": [os.environ.get("CHAT_BASELINE_BIN", "chat-server-baseline-unset"), "--listen", "127.0.0.1:{port}", "--in-memory",
                "--cluster", "{nats_urls}", "--identity", "raw-ip"] + OUR_FLAGS,
        "env": {"RUST_LOG": "warn"},
        "note": OUR_NOTE + " --in-memory --identity raw-ip --cluster (one node; the build at CHAT_BASELINE_BIN)",
        "nats": True,
    },
    # Another build of ours, side by side with this one (a change's "before"):
    # CHAT_BASELINE_BIN=/path/to/chat-server, same flags as chat-server.
    "chat-server-baseline": {
        "cmd": [os.environ.get("CHAT_BASELINE_BIN", "chat-server-baseline-unset"), "--listen", "127.0.0.1:{port}", "--in-memory"] + OUR_FLAGS,
        "env": {"RUST_LOG": "warn"},
        "note": OUR_NOTE + " --in-memory (the build at CHAT_BASELINE_BIN)",
    },
    # µWebSockets as Bun ships it: Bun.serve with one topic and
    # server.publish, the way its documentation writes a chat.
    "bun": {
        "cmd": [str(BUN_PEER / "node_modules" / ".bin" / "bun"), str(BUN_PEER / "server.js")],
        "env": {"PORT": "{port}", "MESSAGE_RATE": "1000000"},
        "note": "MESSAGE_RATE=1000000 (Bun, uWebSockets underneath; version in its start-up line)",
    },
    "node-ws": {
        "cmd": ["node", str(NODE_PEER / "server.js")],
        "env": {"PORT": "{port}", "MESSAGE_RATE": "1000000"},
        "note": "MESSAGE_RATE=1000000 (Node.js %s, ws 8)" % subprocess.run(
            ["node", "--version"], capture_output=True, text=True).stdout.strip(),
    },
}

def scenarios(quick):
    if quick:
        return {
            "fanout": ["fanout", "--clients", "100", "--senders", "10", "--rate", "100", "--duration", "3s", "--warmup", "1s"],
            "saturate": ["saturate", "--clients", "100", "--senders", "10", "--in-flight", "4", "--duration", "3s", "--warmup", "1s"],
            "connect": ["connect", "--clients", "100", "--history", "1000", "--prefill-senders", "20"],
            "idle": ["idle", "--clients", "1000"],
        }
    return {
        "fanout": ["fanout", "--clients", "1000", "--senders", "50", "--rate", "100", "--duration", "10s"],
        "fanout500": ["fanout", "--clients", "1000", "--senders", "50", "--rate", "500", "--duration", "10s"],
        "saturate": ["saturate", "--clients", "1000", "--senders", "50", "--in-flight", "4", "--duration", "10s"],
        # The most commands through one stream: few receivers, every client
        # sends, spread over a cluster's nodes.
        "stream": ["saturate", "--clients", "60", "--senders", "60", "--in-flight", "8", "--duration", "10s",
                   "--spread-senders"],
        "connect": ["connect", "--clients", "1000", "--history", "10000", "--prefill-senders", "200"],
        "idle": ["idle", "--clients", "10000"],
    }


# The highest fan-out rate that holds p99 under 50 ms; only with --only
# sweep (one run: each step is a full fan-out run).
SWEEP = ["fanout", "--clients", "1000", "--senders", "50", "--rate", "225", "--duration", "8s",
         "--sweep-p99-ms", "50"]

# Durable against in-memory: the cost of committing before broadcasting,
# with many concurrent senders.
DURABLE = {
    "saturate-senders": ["saturate", "--clients", "200", "--senders", "200", "--in-flight", "4", "--duration", "10s"],
}
# Reconnecting after a blip, resuming with ?since= against a plain /ws that
# replays the whole history: our server only (the seed protocol has no
# positions), in memory and durable.
RECONNECT = {
    "reconnect": ["reconnect", "--clients", "1000", "--history", "10000", "--prefill-senders", "200", "--missed", "100"],
}
RECONNECT_QUICK = {
    "reconnect": ["reconnect", "--clients", "100", "--history", "1000", "--prefill-senders", "20", "--missed", "20"],
}
DURABLE_QUICK = {
    "saturate-senders": ["saturate", "--clients", "50", "--senders", "50", "--in-flight", "4", "--duration", "3s", "--warmup", "1s"],
}


# Three nodes on one nats-server, the clients spread: the senders on the
# first node, every other client on the other two, so each message is
# measured from a sender on node A to receivers on nodes B and C. CPU per
# frame is summed over the three nodes (cpu_cores.server + cpu_cores.peers);
# nats-server's is beside it.
SERVERS["chat-server-cluster3-spread"] = dict(
    SERVERS["chat-server-cluster3"], spread=True,
    note=OUR_NOTE + " --in-memory --identity raw-ip --cluster (three nodes, senders on one, receivers on the other two, nats-server -js)")
# The same on three routed nats-servers and an R3 stream (each node given
# all three URLs): the stream survives a NATS server.
SERVERS["chat-server-cluster3-spread-r3"] = dict(
    SERVERS["chat-server-cluster3-spread"], nats="r3",
    cmd=SERVERS["chat-server-cluster3"]["cmd"] + ["--cluster-replicas", "3"],
    note=OUR_NOTE + " --in-memory --identity raw-ip --cluster --cluster-replicas 3 (three nodes spread as above, three routed nats-servers)")
# The same on one nats-server that fsyncs every entry before its ack.
SERVERS["chat-server-cluster3-spread-sync"] = dict(
    SERVERS["chat-server-cluster3-spread"], nats="sync-always",
    note=OUR_NOTE + " --in-memory --identity raw-ip --cluster (three nodes spread as above, nats-server -js with sync_interval: always)")

# Failover (three-node kinds): 1,000 clients follow node A while a client on
# node B posts 50 messages a second; A is SIGKILLed after 3 s, and its
# clients resume on B and C with ?since=. Only with --only failover.
FAILOVER = ["failover", "--clients", "1000", "--rate", "50", "--before", "3s", "--after", "3s",
            "--kill-pid", "{pid}"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """A process's user and system CPU time so far, in seconds."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_nats(datadir, mode=True):
    """nats-servers with JetStream, their stores in datadir: (processes,
    client ports). mode "sync-always": one that fsyncs every entry before
    acknowledging it; "r3": three routed servers (for an R3 stream);
    otherwise one."""
    count = 3 if mode == "r3" else 1
    ports = [free_port() for _ in range(count)]
    routes = [free_port() for _ in range(count)]
    procs = []
    for i in range(count):
        conf = os.path.join(datadir, f"nats-{i}.conf")
        with open(conf, "w") as f:
            f.write("server_name: n%d\njetstream {\n  store_dir: %s\n%s}\n" % (
                i, json.dumps(os.path.join(datadir, f"nats-{i}")),
                "  sync_interval: always\n" if mode == "sync-always" else ""))
            if count > 1:
                f.write("cluster {\n  name: bench\n  listen: 127.0.0.1:%d\n  routes: [%s]\n}\n" % (
                    routes[i], ", ".join(f"nats-route://127.0.0.1:{r}" for r in routes)))
        procs.append(subprocess.Popen(["nats-server", "-c", conf, "-a", "127.0.0.1", "-p", str(ports[i])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.time() + 30
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    for p in procs:
                        p.kill()
                    raise RuntimeError("nats-server did not start")
                time.sleep(0.01)
    return procs, ports


def wait_healthy(port, deadline):
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError("the node did not become healthy")


def start(name, datadir=None):
    spec = SERVERS[name]
    port = free_port()
    datadir = datadir or tempfile.mkdtemp(prefix="chat-bench-")
    fill = dict(port=port, datadir=datadir)
    nats = []
    if spec.get("nats"):
        nats, nats_ports = start_nats(datadir, spec["nats"])
        fill["nats_urls"] = ",".join(f"nats://127.0.0.1:{p}" for p in nats_ports)
    cmd = [c.format(**fill) for c in spec["cmd"]]
    env = dict(os.environ, **{k: v.format(**fill) for k, v in spec["env"].items()})
    peers = []
    taken = {port, *(int(u.rsplit(":", 1)[1]) for u in fill.get("nats_urls", "").split(",") if u)}
    for _ in range(spec.get("peers", 0)):
        peer_port = free_port()
        while peer_port in taken:
            peer_port = free_port()
        taken.add(peer_port)
        peer_cmd = [c.format(**dict(fill, port=peer_port)) for c in spec["cmd"]]
        log = open(os.path.join(datadir, f"peer-{peer_port}.log"), "w")
        peers.append((subprocess.Popen(peer_cmd, env=env, stdout=subprocess.DEVNULL, stderr=log), peer_port))
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            if nats:
                # A cluster node binds at once and serves once caught up.
                wait_healthy(port, deadline)
                for _, peer_port in peers:
                    wait_healthy(peer_port, deadline)
            proc.started_in = time.time() - t0
            proc.datadir = datadir
            proc.nats = nats
            proc.peers = [p for p, _ in peers]
            proc.peer_ports = [peer_port for _, peer_port in peers]
            return proc, port
        except OSError:
            time.sleep(0.01)
    proc.kill()
    for p, peer_port in peers:
        p.kill()
        print(f"peer on {peer_port}: " + open(os.path.join(datadir, f"peer-{peer_port}.log")).read()[-2000:], file=sys.stderr)
    for p in nats:
        p.kill()
    raise RuntimeError(f"{name} did not start")


def stop(proc):
    for p in [proc] + getattr(proc, "peers", []) + getattr(proc, "nats", []):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def loadgen(port, pid, args, note, others=(), peer_pids=(), nats_pids=()):
    urls = ",".join(f"ws://127.0.0.1:{p}/ws" for p in [port, *others])
    cmd = [str(TARGET / "chat-loadgen"), "--url", urls,
           "--server-pid", str(pid), f"--note={note}", "--json"]
    if peer_pids:
        cmd.append("--peer-pids=" + ",".join(map(str, peer_pids)))
    if nats_pids:
        cmd.append("--nats-pids=" + ",".join(map(str, nats_pids)))
    cmd += [a.format(pid=pid) for a in args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"results": {"error": out.stderr[-500:]}}


def pick(result, path):
    if path in ("cpu_per_frame_us", "cpu_per_frame_with_nats_us"):
        # Derived: the server's CPU (cores; a cluster's nodes summed, and
        # nats-server's too in the second) over the frames delivered.
        cores, frames = pick(result, "cpu_cores.server"), pick(result, "delivered_frames_per_s")
        cores = cores and cores + (pick(result, "cpu_cores.peers") or 0)
        if path == "cpu_per_frame_with_nats_us":
            nats = pick(result, "cpu_cores.nats")
            cores = cores and nats is not None and cores + nats
        return cores / frames * 1e6 if cores and frames else None
    v = result.get("results", {})
    for key in path.split("."):
        v = v.get(key) if isinstance(v, dict) else None
    return v


METRICS = {
    "fanout": [("delivered frames/s", "delivered_frames_per_s", "{:,.0f}"),
               ("**server CPU per delivered frame (µs)**", "cpu_per_frame_us", "{:.2f}"),
               ("p50 ms", "latency_ms.p50", "{:.2f}"), ("p99 ms", "latency_ms.p99", "{:.2f}"),
               ("p99.9 ms", "latency_ms.p99_9", "{:.2f}"), ("max ms", "latency_ms.max", "{:.2f}"),
               ("frames lost", "frames_lost", "{:.0f}"),
               ("server CPU (cores)", "cpu_cores.server", "{:.2f}"), ("loadgen CPU (cores)", "cpu_cores.loadgen", "{:.2f}"),
               ("nats-server CPU (cores, cluster only)", "cpu_cores.nats", "{:.2f}"),
               ("the other nodes' CPU (cores, summed; three nodes only)", "cpu_cores.peers", "{:.2f}"),
               ("CPU per delivered frame, nodes and nats-server (µs)", "cpu_per_frame_with_nats_us", "{:.2f}")],
    "saturate": [("delivered frames/s", "delivered_frames_per_s", "{:,.0f}"),
                 ("**server CPU per delivered frame (µs)**", "cpu_per_frame_us", "{:.2f}"),
                 ("messages sent/s", "send_rate_per_s", "{:,.0f}"),
                 ("p50 ms", "latency_ms.p50", "{:.1f}"), ("p99 ms", "latency_ms.p99", "{:.1f}"),
                 ("frames lost", "frames_lost", "{:.0f}"),
                 ("server CPU (cores)", "cpu_cores.server", "{:.2f}"), ("loadgen CPU (cores)", "cpu_cores.loadgen", "{:.2f}"),
                 ("nats-server CPU (cores, cluster only)", "cpu_cores.nats", "{:.2f}"),
                 ("the other nodes' CPU (cores, summed; three nodes only)", "cpu_cores.peers", "{:.2f}"),
                 ("CPU per delivered frame, nodes and nats-server (µs)", "cpu_per_frame_with_nats_us", "{:.2f}")],
    "connect": [("all clients have history (s)", "all_have_history_s", "{:.2f}"),
                ("per client p50 (s)", "per_client_s.p50", "{:.2f}"), ("per client max (s)", "per_client_s.max", "{:.2f}"),
                ("history frames/s", "history_frames_per_s", "{:,.0f}"), ("failures", "failures", "{:.0f}")],
    "reconnect": [("since: all caught up (s)", "since.all_caught_up_s", "{:.2f}"),
                  ("full: all caught up (s)", "full.all_caught_up_s", "{:.2f}"),
                  ("since: bytes per client", "since.bytes_per_client", "{:,.0f}"),
                  ("full: bytes per client", "full.bytes_per_client", "{:,.0f}"),
                  ("since: server CPU (s)", "since.server_cpu_s", "{:.2f}"),
                  ("full: server CPU (s)", "full.server_cpu_s", "{:.2f}"),
                  ("full / since: bytes", "full_over_since.bytes", "{:.1f}×"),
                  ("full / since: time", "full_over_since.time", "{:.1f}×"),
                  ("full / since: server CPU", "full_over_since.server_cpu", "{:.1f}×"),
                  ("resets (since)", "since.resets", "{:.0f}"),
                  ("failures", "since.failures", "{:.0f}")],
    "failover": [("**all clients resumed elsewhere (s after the kill)**", "all_resumed_s", "{:.3f}"),
                 ("per client: resumed p50 ms", "resumed_ms.p50", "{:.1f}"),
                 ("per client: resumed p99 ms", "resumed_ms.p99", "{:.1f}"),
                 ("per client: socket closed, max ms", "noticed_ms.max", "{:.1f}"),
                 ("messages acknowledged to the sender", "messages_acknowledged", "{:.0f}"),
                 ("messages missing (all clients)", "messages_missing", "{:.0f}"),
                 ("duplicates", "duplicates", "{:.0f}"), ("resets", "resets", "{:.0f}"),
                 ("clients never resumed", "clients_never_resumed", "{:.0f}")],
    "idle": [("**server bytes per idle connection**", "server_bytes_per_connection", "{:,.0f}"),
             ("failures", "failures", "{:.0f}")],
}

# The most commands through one stream is a saturation run too.
METRICS["stream"] = METRICS["saturate"]

def median(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--servers", default="chat-server,chat-server-2t,bun,node-ws")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "chat-server", "-p", "chat-loadgen"], cwd=ROOT, check=True)
    for peer in (NODE_PEER, BUN_PEER):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=peer, check=True)
    chosen = scenarios(args.quick)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    servers = args.servers.split(",")
    raw = {}
    plan = [(scen, scen_args, servers) for scen, scen_args in chosen.items()]
    if not args.only or "reconnect" in args.only.split(","):
        reconnect = RECONNECT_QUICK if args.quick else RECONNECT
        plan += [(scen, scen_args, ["chat-server", "chat-server-durable"]) for scen, scen_args in reconnect.items()]
        chosen.update(reconnect)
    if "failover" in args.only.split(","):
        plan.append(("failover", FAILOVER, [s for s in servers if SERVERS[s].get("peers")]))
        chosen["failover"] = FAILOVER
    if not args.only or "durable" in args.only:
        durable = DURABLE_QUICK if args.quick else DURABLE
        plan += [(scen, scen_args, ["chat-server-durable", "chat-server"]) for scen, scen_args in durable.items()]
        chosen.update(durable)
    # Interleaved: run 1 of every server, then run 2 of every server, ...,
    # so a slow minute of this shared machine falls on all of them alike.
    for scen, scen_args, on in plan:
        for run in range(args.runs):
            for server in on:
                try:
                    proc, port = start(server)
                except RuntimeError as e:
                    print(f"{scen:16} {server:20} run {run + 1}: ERROR {e}", file=sys.stderr)
                    continue
                try:
                    spread = proc.peer_ports if SERVERS[server].get("spread") else ()
                    r = loadgen(port, proc.pid, scen_args, SERVERS[server]["note"], spread,
                                [p.pid for p in proc.peers], [p.pid for p in proc.nats])
                finally:
                    stop(proc)
                    shutil.rmtree(proc.datadir, ignore_errors=True)
                raw.setdefault(scen, {}).setdefault(server, []).append(r)
                err = r.get("results", {}).get("error")
                print(f"{scen:16} {server:20} run {run + 1}: {'ERROR ' + err if err else 'ok'}", file=sys.stderr)
    if "sweep" in args.only.split(","):
        proc, port = start("chat-server")
        try:
            raw["sweep"] = loadgen(port, proc.pid, SWEEP, SERVERS["chat-server"]["note"])
        finally:
            stop(proc)
        print(f"sweep: {'ERROR' if raw['sweep'].get('results', {}).get('error') else 'ok'}", file=sys.stderr)
    if not args.only or "startup" in args.only:
        try:
            raw["startup"] = startup(args.runs, 2000 if args.quick else 100_000)
        except Exception as e:  # keep the other results
            print(f"startup: ERROR {e}", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(raw, indent=1))
    print(f"raw results: benches/results/{stamp}.json\n")
    for scen, by_server in raw.items():
        if scen == "sweep":
            r = by_server
            print(f"### sweep: `chat-loadgen {' '.join(SWEEP)}` (server flags: {r.get('note')})\n")
            print("| messages/s | delivered frames/s | p99 ms | lost | held |\n|---|---|---|---|---|")
            for step in r.get("results", {}).get("steps", []):
                print(f"| {step['rate']:,.0f} | {step['delivered_frames_per_s'] or 0:,.0f} | {step['p99_ms']:.1f} "
                      f"| {step['frames_lost']} | {'yes' if step['held'] else 'no'} |")
            best = (r.get("results", {}).get("highest_rate_held") or {}).get("result", {})
            print(f"\nat the highest rate held: CPU server {pick({'results': best}, 'cpu_cores.server')}, "
                  f"loadgen {pick({'results': best}, 'cpu_cores.loadgen')}; latency {best.get('latency_ms')}\n")
            continue
        if scen == "startup":
            r = by_server
            print(f"### startup with {r['messages']:,} stored messages (`--history-limit {r['messages']}`)\n")
            print(f"| metric (median of {len(r['seconds'])}) | chat-server (durable) |\n|---|---|")
            print(f"| spawn to accepting connections (s) | {statistics.median(r['seconds']):.3f} |\n")
            continue
        names = list(by_server)
        print(f"### {scen}: `chat-loadgen {' '.join(chosen[scen])}`\n")
        # Against the peer to beat: each of ours over Bun's.
        ours = [n for n in names if n.startswith("chat-server")] if "bun" in names and len(names) > 2 else []
        extra = "".join(f" {n} / bun |" for n in ours) if ours else (" ratio |" if len(names) == 2 else "")
        print("| metric (median of %d) | %s |%s" % (args.runs, " | ".join(names), extra))
        print("|---|%s%s" % ("---|" * len(names), "---|" * (len(ours) or (1 if len(names) == 2 else 0))))
        # "fanout500" is the fan-out at another rate.
        metric_set = METRICS[scen.split("-")[0].rstrip("0123456789")]
        for label, path, fmt in metric_set:
            meds = [median([pick(r, path) for r in by_server[s]]) for s in names]
            cells = [fmt.format(m) if m is not None else "-" for m in meds]
            ratio = ""
            if ours:
                bun = meds[names.index("bun")]
                for n in ours:
                    a = meds[names.index(n)]
                    ratio += " %.2f× |" % (a / bun) if a and bun else " - |"
            elif len(names) == 2:
                a, b = meds
                ratio = " %.2f× |" % (a / b) if a and b else " - |"
            print(f"| {label} | {' | '.join(cells)} |{ratio}")
        print()


def startup(runs, messages):
    """Time from spawn to accepting connections, with `messages` stored."""
    datadir = tempfile.mkdtemp(prefix="chat-bench-startup-")
    SERVERS["startup"] = dict(SERVERS["chat-server-durable"])
    SERVERS["startup"]["cmd"] = SERVERS["chat-server-durable"]["cmd"] + ["--history-limit", str(messages)]
    proc, port = start("startup", datadir)
    try:
        # Few senders: each one reads every message, and a reader that
        # falls too far behind is (rightly) dropped by the server.
        r = loadgen(port, proc.pid, ["connect", "--clients", "1", "--history", str(messages), "--prefill-senders", "20"],
                    "filling the store")
        if r.get("results", {}).get("error"):
            raise RuntimeError(r["results"]["error"])
    finally:
        stop(proc)
    seconds = []
    for _ in range(runs):
        proc, port = start("startup", datadir)
        seconds.append(proc.started_in)
        stop(proc)
    shutil.rmtree(datadir, ignore_errors=True)
    print(f"startup with {messages} messages: {seconds}", file=sys.stderr)
    return {"messages": messages, "seconds": seconds}


if __name__ == "__main__":
    main()
