#!/usr/bin/env python3
"""The performance harness behind ./scripts/bench (which builds the release binaries first).

Three Envoys, one per configuration, all running the same demo config in front of the same fast
Rust fake model:

  alone  the ext_proc filter removed
  noop   ext_proc to examples/noop_extproc (answers at once, same message pattern as tokenbudget:
         the floor any ext_proc design stands on)
  tb     ext_proc to tokenbudget, with budgets that match every request (identity, decision,
         reservation, metering, settlement, store writes)

Traffic: non-streaming JSON, SSE with 50 events written back to back, SSE paced like a model (one
event every 2 ms), each at concurrency 1, 16 and 64. Configurations alternate within every round
so drift hits all alike; the tables are medians over rounds. Per run: requests/s, p50/p99, CPU
per request of each process (from /proc/PID/stat), ext_proc messages per request (Envoy stats).
Then: Envoy's own per-phase ext_proc timings (its filter-state access log), settled requests per
store transaction at saturation, time from end of stream to debit visible, and tokenbudget's RSS
with 10,000 streams open.
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")

TRAFFIC = {
    "json": {"stream": False, "headers": {}},
    "sse50": {"stream": True, "headers": {"x-fake-chunks": "50"}},
    "paced": {"stream": True, "headers": {"x-fake-chunks": "50", "x-fake-delay-ms": "2"}},
    # As sse50, from a client that asks for usage itself (stream_options.include_usage): nothing
    # to inject into the request, no usage event to cut out of the response.
    "sse50u": {"stream": True, "include_usage": True, "headers": {"x-fake-chunks": "50"}},
}


def demo_config(fake_port):
    """envoy/demo.yaml in front of the fake model on `fake_port`. The fake model is one upstream
    host: its circuit breakers let it take every connection the load opens."""
    text = open(os.path.join(ROOT, "envoy/demo.yaml")).read()
    text = text.replace("port_value: 8000 }", f"port_value: {fake_port} }}")
    return text.replace("""  - name: upstream
    type: STATIC
    connect_timeout: 1s""", """  - name: upstream
    type: STATIC
    connect_timeout: 1s
    circuit_breakers:
      thresholds: [{ max_requests: 100000, max_pending_requests: 100000, max_connections: 100000 }]""")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(url, secs=30):
    end = time.time() + secs
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {url}")


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def envoy_stat(admin, name):
    with urllib.request.urlopen(f"http://{admin}/stats?filter=^{re.escape(name)}$") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + ": "):
                return int(line.split(": ")[1])
    return 0


def jwt(sub):
    out = subprocess.run(
        ["bash", "-c", f"source {ROOT}/scripts/lib.sh; demo_jwt {sub}"],
        capture_output=True, text=True, check=True)
    return out.stdout.strip()


def ms(v):
    if v.endswith("us"):
        return float(v[:-2]) / 1000
    if v.endswith("ms"):
        return float(v[:-2])
    if v.endswith("s"):
        return float(v[:-1]) * 1000
    return float(v)


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="tokenbudget-bench.")
        self.procs = []
        self.envoy_bin = os.environ["TOKENBUDGET_ENVOY"]
        self.tb_bin = os.path.join(ROOT, "target/release/tokenbudget")

    def spawn(self, name, argv, env=None):
        log = open(os.path.join(self.work, f"{name}.log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, **(env or {})})
        self.procs.append(p)
        return p

    def stop(self):
        if getattr(self, "pg_db", None):
            self.tb.send_signal(signal.SIGTERM)
            self.tb.wait(timeout=30)
        for p in self.procs:
            try:
                p.send_signal(signal.SIGTERM)
            except Exception:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except Exception:
                p.kill()
        if getattr(self, "pg_db", None):
            subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c",
                            f"DROP DATABASE IF EXISTS {self.pg_db} WITH (FORCE)"], capture_output=True)

    def start(self):
        a = self.args
        self.fake_port, self.noop_port = free_port(), free_port()
        self.grpc, self.admin = free_port(), free_port()
        self.fake = self.spawn("fake", [os.path.join(ROOT, "target/release/examples/fake_model"),
                                        f"127.0.0.1:{self.fake_port}"], {"FAKE_RECORD": "0"})
        self.noop = self.spawn("noop", [os.path.join(ROOT, "target/release/examples/noop_extproc"),
                                        f"127.0.0.1:{self.noop_port}", "--pattern", a.noop_pattern,
                                        "--style", a.noop_style, "--runtime", a.noop_runtime])
        self.db = os.path.join(self.work, "tb.db")
        if a.store == "postgres":
            self.pg_db = f"tb_bench_{os.getpid()}"
            subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c",
                            f"CREATE DATABASE {self.pg_db}"], check=True)
            store = f'database_url = "postgres://postgres@127.0.0.1:5432/{self.pg_db}"'
        else:
            store = f'sqlite_path = "{self.db}"'
        cfg = os.path.join(self.work, "tb.toml")
        with open(cfg, "w") as f:
            f.write(f"""[server]
grpc_listen = "127.0.0.1:{self.grpc}"
admin_listen = "127.0.0.1:{self.admin}"
[store]
{store}
[ledger]
journal_dir = "{self.work}/journal"
[log]
level = "warn"
{a.tb_extra}
""")
        env = {"TOKENBUDGET_CONFIG": cfg}
        subprocess.run([self.tb_bin, "migrate"], env={**os.environ, **env}, check=True,
                       capture_output=True)
        for args in (["--name", "everyone-daily", "--subject", "everyone", "--limit-tokens",
                      "1000000000000000", "--window", "day"],
                     ["--name", "bench-monthly-usd", "--subject", "user:bench", "--limit-usd",
                      "100000000", "--window", "month"]):
            subprocess.run([self.tb_bin, "budgets", "create", *args], env={**os.environ, **env},
                           check=True, capture_output=True)
        self.tb = self.spawn("tb", [self.tb_bin, "serve"], env)
        wait_http(f"http://127.0.0.1:{self.admin}/readyz")

        base = demo_config(self.fake_port)
        a0 = base.index("          - name: envoy.filters.http.ext_proc\n")
        b0 = base.index("          - name: envoy.filters.http.router\n")
        self.envoys = {}
        for name in ("alone", "noop", "tb"):
            port, admin = free_port(), free_port()
            text = base.replace("port_value: 10000 }", f"port_value: {port} }}").replace(
                "port_value: 9901 }", f"port_value: {admin} }}")
            if name == "alone":
                text = text[:a0] + text[b0:]
            else:
                target = self.noop_port if name == "noop" else self.grpc
                text = text.replace("port_value: 9002 }", f"port_value: {target} }}")
            if a.access_log and name != "alone":
                text = text.replace("          stat_prefix: llm\n", f"""          stat_prefix: llm
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {self.work}/access-{name}.log
              log_format:
                text_format_source:
                  inline_string: "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_header_latency_us)% %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_body_total_latency_us)% %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:response_header_latency_us)% %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:response_body_total_latency_us)% %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:response_body_call_count)%\\n"
""", 1)
            path = os.path.join(self.work, f"envoy-{name}.yaml")
            with open(path, "w") as f:
                f.write(text)
            p = self.spawn(f"envoy-{name}", [self.envoy_bin, "-c", path, "--disable-hot-restart",
                                             "--concurrency", "1", "--log-level", "error",
                                             "--base-id", str(free_port())])
            self.envoys[name] = {"port": port, "admin": f"127.0.0.1:{admin}", "pid": p.pid}
            wait_http(f"http://127.0.0.1:{admin}/ready")
        self.token = jwt("bench")
        self.server_pid = {"alone": None, "noop": self.noop.pid, "tb": self.tb.pid}

    def lua(self, traffic):
        t = TRAFFIC[traffic]
        path = os.path.join(self.work, f"{traffic}.lua")
        req = {"model": "gpt-4o-mini", "stream": t["stream"], "max_tokens": 16,
               "messages": [{"role": "user", "content": "Say hello"}]}
        if t.get("include_usage"):
            req["stream_options"] = {"include_usage": True}
        body = json.dumps(req)
        with open(path, "w") as f:
            f.write('wrk.method = "POST"\n')
            f.write(f'wrk.headers["authorization"] = "Bearer {self.token}"\n')
            f.write('wrk.headers["content-type"] = "application/json"\n')
            for k, v in t["headers"].items():
                f.write(f'wrk.headers["{k}"] = "{v}"\n')
            f.write(f"wrk.body = '{body}'\n")
        return path

    def store_pids(self):
        """The Postgres backends serving tokenbudget (their CPU is the store's per-request cost)."""
        if self.args.store != "postgres":
            return []
        out = subprocess.run(["psql", "-tA", "-h", "127.0.0.1", "-U", "postgres", "-c",
                              f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.pg_db}' AND pid <> pg_backend_pid()"],
                             capture_output=True, text=True).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def run(self, cfg, traffic, conns, secs, stat_prefixes=("tokenbudget",)):
        e = self.envoys[cfg]
        pids = {"envoy": e["pid"], "server": self.server_pid[cfg], "fake": self.fake.pid}
        store_pids = self.store_pids() if cfg == "tb" else []
        s0 = sum(cpu(p) for p in store_pids if os.path.exists(f"/proc/{p}"))
        c0 = {k: cpu(p) for k, p in pids.items() if p}
        stat = lambda prefix: envoy_stat(e["admin"], f"http.llm.ext_proc.{prefix}.stream_msgs_sent") if cfg != "alone" else 0
        m0 = {p: stat(p) for p in stat_prefixes}
        out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", "-s",
                              self.lua(traffic), f"http://127.0.0.1:{e['port']}/v1/chat/completions"],
                             capture_output=True, text=True, check=True).stdout
        c1 = {k: cpu(p) for k, p in pids.items() if p}
        s1 = sum(cpu(p) for p in store_pids if os.path.exists(f"/proc/{p}"))
        m1 = {p: stat(p) for p in stat_prefixes}
        if "Non-2xx" in out or "Socket errors" in out:
            raise SystemExit(f"errors in {cfg} {traffic} c={conns}:\n{out}")
        n = int(re.search(r"(\d+) requests in", out).group(1))
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p50 = ms(re.search(r"\s50%\s+(\S+)", out).group(1))
        p99 = ms(re.search(r"\s99%\s+(\S+)", out).group(1))
        per = lambda k: (c1[k] - c0[k]) * 1000 / TICK / max(n, 1) if k in c0 else None
        return {"rps": rps, "p50": p50, "p99": p99, "n": n, "envoy_cpu": per("envoy"),
                "server_cpu": per("server"), "fake_cpu": per("fake"),
                "store_cpu": (s1 - s0) * 1000 / TICK / max(n, 1) if store_pids else None,
                "msgs": (m1["tokenbudget"] - m0["tokenbudget"]) / max(n, 1),
                "tap_msgs": (m1.get("tap", 0) - m0.get("tap", 0)) / max(n, 1)}


def med(rows, key):
    vals = [r[key] for r in rows if r[key] is not None]
    return statistics.median(vals) if vals else None


def fmt(v, d=3):
    return "—" if v is None else f"{v:.{d}f}"


def throughput(b, args, out):
    results = {}
    configs = ["alone", "noop", "tb"]
    # Warm every path.
    for cfg in configs:
        for traffic in TRAFFIC:
            b.run(cfg, traffic, 4, 1)
    for rnd in range(args.rounds):
        for traffic in args.traffic:
            for conns in args.conns:
                order = configs[rnd % 3:] + configs[:rnd % 3]
                for cfg in order:
                    r = b.run(cfg, traffic, conns, args.seconds)
                    results.setdefault((traffic, conns, cfg), []).append(r)
                    print(f"round {rnd + 1} {traffic:6} c={conns:<3} {cfg:5} {r['rps']:9.0f} req/s "
                          f"p50 {r['p50']:.3f} ms p99 {r['p99']:.3f} ms msgs {r['msgs']:.2f}",
                          file=sys.stderr, flush=True)
    out.append("| traffic | conc | Envoy alone req/s | no-op floor req/s | tokenbudget req/s | tb / floor | tb / alone "
               "| p50 alone / floor / tb (ms) | p99 alone / floor / tb (ms) | added p50 vs floor | msgs/req floor / tb "
               "| Envoy CPU µs/req alone / floor / tb | server CPU µs/req floor / tb |")
    out.append("|" + "---|" * 13)
    summary = {}
    for traffic in args.traffic:
        for conns in args.conns:
            a, f, t = (results[(traffic, conns, c)] for c in configs)
            ra, rf, rt = med(a, "rps"), med(f, "rps"), med(t, "rps")
            pa, pf, pt = med(a, "p50"), med(f, "p50"), med(t, "p50")
            qa, qf, qt = med(a, "p99"), med(f, "p99"), med(t, "p99")
            ea, ef, et = med(a, "envoy_cpu"), med(f, "envoy_cpu"), med(t, "envoy_cpu")
            sf, st = med(f, "server_cpu"), med(t, "server_cpu")
            summary[(traffic, conns)] = {"ratio": rt / rf, "added_p50": pt - pf,
                                         "cpu_ratio": (et + st) / (ef + sf)}
            out.append(f"| {traffic} | {conns} | {ra:.0f} | {rf:.0f} | {rt:.0f} | **{rt / rf:.3f}** | {rt / ra:.3f} "
                       f"| {pa:.3f} / {pf:.3f} / {pt:.3f} | {qa:.3f} / {qf:.3f} / {qt:.3f} | {pt - pf:+.3f} "
                       f"| {med(f, 'msgs'):.2f} / {med(t, 'msgs'):.2f} "
                       f"| {ea * 1000:.0f} / {ef * 1000:.0f} / {et * 1000:.0f} | {sf * 1000:.0f} / {st * 1000:.0f} |")
    out.append("")
    out.append("CPU per request, Envoy + ext_proc server, tokenbudget / floor: " + ", ".join(
        f"{k[0]} c={k[1]} {v['cpu_ratio']:.3f}" for k, v in summary.items()))
    if args.store == "postgres":
        out.append("Postgres backends' CPU per request (the store's share, outside tokenbudget): " + ", ".join(
            f"{t} c={c} {fmt(med(results[(t, c, 'tb')], 'store_cpu'), 3)} ms" for t in args.traffic for c in args.conns))
    return summary


def phases(b, out):
    rows = {}
    for cfg in ("noop", "tb"):
        path = os.path.join(b.work, f"access-{cfg}.log")
        if not os.path.exists(path):
            return
        vals = []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 5 and all(p.isdigit() for p in parts):
                    vals.append([int(p) for p in parts])
        if vals:
            rows[cfg] = [statistics.median(v[i] for v in vals) for i in range(5)]
    if len(rows) == 2:
        out.append("")
        out.append("Envoy's per-request ext_proc timings (its filter state; median over every request of the runs, µs):")
        out.append("")
        out.append("| server | request headers | request body | response headers | response body (total) | response body calls |")
        out.append("|---|---|---|---|---|---|")
        for cfg, v in rows.items():
            out.append(f"| {'no-op floor' if cfg == 'noop' else 'tokenbudget'} | {v[0]:.0f} | {v[1]:.0f} | {v[2]:.0f} | {v[3]:.0f} | {v[4]:.0f} |")


def scrape(b):
    with urllib.request.urlopen(f"http://127.0.0.1:{b.admin}/metrics") as r:
        text = r.read().decode()
    val = lambda name: sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + " "))
    return val


def store(b, out):
    # Saturation: the batch size the writer reached while the throughput runs were going on.
    v = scrape(b)
    batches, records = v("tokenbudget_batch_size_count"), v("tokenbudget_batch_size_sum")
    sat0 = (batches, records)
    b.run("tb", "json", 64, 5)
    v = scrape(b)
    nb, nr = v("tokenbudget_batch_size_count") - sat0[0], v("tokenbudget_batch_size_sum") - sat0[1]
    out.append("")
    out.append(f"Store ({b.args.store}) at saturation (JSON, c=64, 5 s): {nr:.0f} records in {nb:.0f} transactions, "
               f"**{nr / max(nb, 1):.0f} settled requests per transaction**.")
    # Visibility: one request at a time; poll the store for its row from the moment the response ended.
    token = jwt("visibility")
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 16, "messages": []}).encode()
    # Committed = counted in events_written_total (the writer counts after the transaction).
    written = lambda: scrape(b)("tokenbudget_events_written_total")
    lat = []
    for _ in range(50):
        before = written()
        req = urllib.request.Request(f"http://127.0.0.1:{b.envoys['tb']['port']}/v1/chat/completions", data=body,
                                     headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
        with urllib.request.urlopen(req) as r:
            r.read()
        t0 = time.perf_counter()
        while written() <= before:
            time.sleep(0.001)
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    out.append(f"End of response → debit visible in the store, 50 sequential requests: median {statistics.median(lat):.0f} ms, "
               f"max {lat[-1]:.0f} ms (ledger.flush_interval_ms = 100 sets it).")


def memory(b, out, streams):
    """RSS of the ext_proc server (no-op floor, then tokenbudget) with `streams` requests held open
    mid-response through Envoy; the growth over idle, per open stream. Run it in fresh processes
    (`--skip throughput store`): after the load phases the allocator keeps freed memory, which new
    streams reuse without growing RSS, so the figure would come out low."""
    lua = os.path.join(b.work, "hold.lua")
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "max_tokens": 16, "messages": []})
    with open(lua, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write(f'wrk.headers["authorization"] = "Bearer {b.token}"\n')
        f.write('wrk.headers["content-type"] = "application/json"\n')
        f.write('wrk.headers["x-fake-chunks"] = "4"\nwrk.headers["x-fake-delay-ms"] = "12000"\n')
        f.write(f"wrk.body = '{body}'\n")
    out.append("")
    for cfg, pid in (("noop", b.noop.pid), ("tb", b.tb.pid)):
        idle = rss_kib(pid)
        e = b.envoys[cfg]
        wrk = subprocess.Popen(["wrk", "-t2", f"-c{streams}", "-d50s", "--timeout", "90s", "-s", lua,
                                f"http://127.0.0.1:{e['port']}/v1/chat/completions"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak, held = idle, 0
        end = time.time() + 45
        while time.time() < end:
            time.sleep(1)
            active = envoy_stat(e["admin"], "http.llm.downstream_rq_active")
            if active >= held:
                held = active
                peak = max(peak, rss_kib(pid))
        wrk.wait()
        per = (peak - idle) * 1024 / max(held, 1)
        label = "no-op floor" if cfg == "noop" else "tokenbudget"
        out.append(f"Memory, {label}: RSS {idle / 1024:.1f} MiB idle, {peak / 1024:.1f} MiB with {held} streams open "
                   f"(mid-response; tokenbudget metering each): **{per:.0f} bytes per in-flight stream** "
                   f"(RSS growth / streams; tonic's and h2's per-stream state included).")
        time.sleep(6)


EXT_PROC_FILTER = "          - name: envoy.filters.http.ext_proc\n"
ROUTER_FILTER = "          - name: envoy.filters.http.router\n"

TAP = """          - name: envoy.filters.http.ext_proc.tap
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: { cluster_name: tokenbudget }
              observability_mode: true
              processing_mode:
                request_header_mode: SKIP
                response_header_mode: SEND
                response_body_mode: STREAMED
              stat_prefix: tap
"""

APM = """          - name: envoy.filters.http.ai_protocol_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ai_protocol_manager.v3.AiProtocolManager
              response_handling:
                token_usage: { include_unconfigured_routes: true, usage_signal: SYNTHESIZE_TRAILERS }
"""


def strategies(b, args, out):
    """The response-body strategies of reference/extproc.md §11, at the protocol level: Envoy in front of
    no-op servers speaking each message pattern, so only the protocol's own cost shows."""
    noop = os.path.join(ROOT, "target/release/examples/noop_extproc")
    servers = {}
    for pattern in ("tokenbudget", "lean", "gate", "headers"):
        port = free_port()
        p = b.spawn(f"noop-{pattern}", [noop, f"127.0.0.1:{port}", "--pattern", pattern])
        servers[pattern] = (port, p.pid)
    time.sleep(0.5)
    base = demo_config(b.fake_port)
    runtime = """layered_runtime:
  layers:
  - name: static
    static_layer:
      envoy.reloadable_features.ext_proc_inject_data_with_state_update: true
"""
    variants = {
        "A: STREAMED body (tokenbudget's default)": ("tokenbudget", lambda t: t),
        "A': STREAMED body, no response-headers message": ("lean", lambda t: t),
        "B: headers gate + observability tap": ("gate", lambda t: t.replace(ROUTER_FILTER, TAP + ROUTER_FILTER) + runtime),
        "C: gate + AI protocol manager usage at trailers": ("gate", lambda t: t.replace(ROUTER_FILTER, APM + ROUTER_FILTER).replace(
            "                response_trailer_mode: SKIP\n              metadata_options:\n                forwarding_namespaces: { untyped: [envoy.filters.http.jwt_authn] }",
            "                response_trailer_mode: SEND\n              metadata_options:\n                forwarding_namespaces: { untyped: [envoy.filters.http.jwt_authn], typed: [envoy.ai.token_usage] }")),
        "headers only (2 messages)": ("headers", lambda t: t),
    }
    envoys = {}
    for name, (pattern, edit) in variants.items():
        port, admin = free_port(), free_port()
        text = edit(base.replace("port_value: 9002 }", f"port_value: {servers[pattern][0]} }}")
                    .replace("port_value: 10000 }", f"port_value: {port} }}").replace("port_value: 9901 }", f"port_value: {admin} }}"))
        path = os.path.join(b.work, f"envoy-strategy-{pattern}-{len(envoys)}.yaml")
        with open(path, "w") as f:
            f.write(text)
        p = b.spawn(f"envoy-strategy-{len(envoys)}", [b.envoy_bin, "-c", path, "--disable-hot-restart", "--concurrency", "1",
                                                       "--log-level", "error", "--base-id", str(free_port())])
        wait_http(f"http://127.0.0.1:{admin}/ready")
        envoys[name] = {"port": port, "admin": f"127.0.0.1:{admin}", "pid": p.pid}
        b.envoys[name] = envoys[name]
        b.server_pid[name] = servers[pattern][1]
    names = ["alone"] + list(variants)
    results = {}
    for rnd in range(args.rounds):
        for traffic in args.traffic:
            for conns in args.conns:
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                for cfg in order:
                    r = b.run(cfg, traffic, conns, args.seconds, stat_prefixes=("tokenbudget", "tap"))
                    results.setdefault((traffic, conns, cfg), []).append(r)
                    print(f"round {rnd + 1} {traffic:6} c={conns:<3} {cfg[:30]:30} {r['rps']:9.0f} req/s p50 {r['p50']:.3f} ms msgs {r['msgs']:.2f}",
                          file=sys.stderr, flush=True)
    out.append("| traffic | conc | strategy | req/s | / alone | p50 ms | awaited msgs/req | observed msgs/req | Envoy CPU µs/req | server CPU µs/req |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for traffic in args.traffic:
        for conns in args.conns:
            alone = med(results[(traffic, conns, "alone")], "rps")
            for cfg in names:
                rs = results[(traffic, conns, cfg)]
                out.append(f"| {traffic} | {conns} | {cfg} | {med(rs, 'rps'):.0f} | {med(rs, 'rps') / alone:.2f} | {med(rs, 'p50'):.3f} "
                           f"| {med(rs, 'msgs'):.2f} | {med(rs, 'tap_msgs'):.2f} | {fmt((med(rs, 'envoy_cpu') or 0) * 1000, 0)} "
                           f"| {fmt((med(rs, 'server_cpu') or 0) * 1000, 0)} |")


def profile(b, out, traffic, secs, conns=16):
    """perf samples of tokenbudget under load: where its CPU per request goes."""
    wrk = subprocess.Popen(["wrk", "-t1", f"-c{conns}", f"-d{secs + 4}s", "-s", b.lua(traffic),
                            f"http://127.0.0.1:{b.envoys['tb']['port']}/v1/chat/completions"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    data = os.path.join(b.work, "perf.data")
    subprocess.run(["perf", "record", "-q", "-F", "1999", "-g", "-p", str(b.tb.pid), "-o", data,
                    "--", "sleep", str(secs)], capture_output=True, check=True)
    wrk.wait()

    def top(sort, extra=()):
        rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--percent-limit", "1.5",
                              "--sort", sort, "-g", "none", *extra], capture_output=True, text=True).stdout
        return [re.sub(r"\s{2,}", "  ", line).rstrip(" -") for line in rep.splitlines()
                if line.strip() and not line.startswith("#")]

    out.append("")
    out.append(f"perf, tokenbudget, {traffic} c={conns}, {secs} s — by thread:")
    out += ["    " + line for line in top("comm")]
    out.append("by symbol (self time, ≥ 1.5 %):")
    out += ["    " + line for line in top("comm,dso,symbol")[:40]]
    # Self time by owner: our crate, the gRPC/HTTP2 stack, the store, the allocator, the kernel.
    rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--percent-limit", "0",
                          "--sort", "dso,symbol", "-g", "none"], capture_output=True, text=True).stdout
    owners = {}
    for line in rep.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3)
        if dso.startswith("[kernel"):
            owner = "kernel (syscalls, scheduling, TCP)"
        elif "libc" in dso and any(k in sym for k in ("malloc", "free", "realloc", "cfree")):
            owner = "allocator"
        elif "libc" in dso:
            owner = "libc (memcpy, …)"
        elif "sqlite3" in sym or sym.startswith("rusqlite"):
            owner = "SQLite"
        else:
            crate = re.match(r"(?:<)?([a-z_][a-z0-9_]*)::", sym)
            name = crate.group(1) if crate else "other"
            owner = {"tokenbudget": "tokenbudget (ours)", "h2": "h2/hyper/tonic/prost", "hyper": "h2/hyper/tonic/prost",
                     "tonic": "h2/hyper/tonic/prost", "prost": "h2/hyper/tonic/prost", "envoy_types": "h2/hyper/tonic/prost",
                     "tokio": "tokio", "bytes": "h2/hyper/tonic/prost", "serde_json": "serde_json (journal, metadata)",
                     "core": "core/alloc (ours and deps)", "alloc": "core/alloc (ours and deps)"}.get(name, f"other ({name})" if crate else "other")
        owners[owner] = owners.get(owner, 0.0) + pct
    out.append("by owner (self time):")
    for owner, pct in sorted(owners.items(), key=lambda kv: -kv[1]):
        if pct >= 0.5:
            out.append(f"    {pct:5.1f} %  {owner}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--traffic", nargs="+", default=list(TRAFFIC), choices=list(TRAFFIC))
    ap.add_argument("--noop-pattern", default="tokenbudget")
    ap.add_argument("--noop-style", default="stream")
    ap.add_argument("--noop-runtime", default="current")
    ap.add_argument("--tb-extra", default="", help="TOML appended to tokenbudget's config")
    ap.add_argument("--store", default="sqlite", choices=["sqlite", "postgres"])
    ap.add_argument("--access-log", action="store_true", help="per-phase timings (costs Envoy CPU)")
    ap.add_argument("--streams", type=int, default=10000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "store", "memory"])
    ap.add_argument("--strategies", action="store_true", help="compare the response-body strategies (no-op servers)")
    ap.add_argument("--profile", type=int, default=0, help="seconds of perf sampling of tokenbudget (JSON, c=16)")
    ap.add_argument("--profile-traffic", default="json", choices=list(TRAFFIC))
    ap.add_argument("--profile-conns", type=int, default=16)
    args = ap.parse_args()
    b = Bench(args)
    out = []
    try:
        b.start()
        out.append(f"tokenbudget bench, {time.strftime('%Y-%m-%d %H:%M')}: {args.rounds} rounds × {args.seconds} s, "
                   f"no-op pattern {args.noop_pattern}, style {args.noop_style}, runtime {args.noop_runtime}"
                   + (f", tokenbudget extra: {args.tb_extra!r}" if args.tb_extra else ""))
        out.append("")
        if args.strategies:
            strategies(b, args, out)
        elif "throughput" not in args.skip:
            throughput(b, args, out)
            phases(b, out)
        if "store" not in args.skip:
            store(b, out)
        if "memory" not in args.skip:
            memory(b, out, args.streams)
        if args.profile:
            profile(b, out, args.profile_traffic, args.profile, args.profile_conns)
    finally:
        b.stop()
    print("\n".join(out))
    print(f"\n(work directory {b.work})", file=sys.stderr)


if __name__ == "__main__":
    main()
