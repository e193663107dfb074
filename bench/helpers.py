#!/usr/bin/env python3
"""Helpers for bench/run.sh (standard library only, any python3 >= 3.9).

    helpers.py get HOST:PORT PATH                 one GET; prints status, x-bench-signed, body length
    helpers.py wait HOST:PORT PATH [SECONDS]      polls until the GET answers 200
    helpers.py hold HOST:PORT PATH N              opens N keep-alive connections, one request each,
                                                  prints "held N" and keeps them open until stdin closes
    helpers.py startup N ADMIN PROXY PATH -- CMD  starts CMD N times; per start, ms from exec to
                                                  /readyz 200 and to the first proxied 200 (JSON)
    helpers.py latency MODE HOST:PORT PATH N CA   N sequential GETs on one keep-alive connection;
                                                  MODE plain (HTTP to HOST:PORT), tls (TLS to
                                                  HOST:PORT as api.coinbase.com) or tunnel (CONNECT
                                                  api.coinbase.com:443 through HOST:PORT, then TLS);
                                                  CA verifies TLS; prints p50/p99 ms (JSON)
    helpers.py summarize DIR                      the results table (markdown) from DIR
    helpers.py readme DIR README RESULTS          rewrites README's performance table (between its
                                                  BENCH-TABLE markers) from DIR
"""

import json
import os
import re
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import time


def addr(hostport):
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def request_bytes(path):
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: cbgate-bench\r\n\r\n".encode()


def read_response(sock):
    """Reads one HTTP/1.1 response with a content-length (or chunked) body.
    Returns (status, headers dict, body bytes)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            rest += chunk
        return status, headers, rest[:n]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            body += rest[:size]
            rest = rest[size + 2 :]
            if size == 0:
                return status, headers, body
    return status, headers, rest


def get(hostport, path, timeout=2.0):
    with socket.create_connection(addr(hostport), timeout=timeout) as s:
        s.sendall(request_bytes(path))
        return read_response(s)


def status_or_none(hostport, path):
    try:
        return get(hostport, path, timeout=1.0)[0]
    except OSError:
        return None


def cmd_get(hostport, path):
    status, headers, body = get(hostport, path)
    print(status, headers.get("x-bench-signed", "-"), len(body))


def cmd_wait(hostport, path, seconds="30"):
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        if status_or_none(hostport, path) == 200:
            return 0
        time.sleep(0.05)
    print(f"{hostport}{path} did not answer 200 within {seconds}s", file=sys.stderr)
    return 1


def cmd_hold(hostport, path, n):
    n = int(n)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
    socks = []
    bad = 0
    # One at a time: each connection sends one request and reads its answer, so cbgate reuses
    # one pooled upstream connection instead of opening n.
    for _ in range(n):
        s = socket.create_connection(addr(hostport), timeout=10)
        s.sendall(request_bytes(path))
        status, _, _ = read_response(s)
        bad += status != 200
        socks.append(s)
    print(f"held {len(socks)} non200={bad}", flush=True)
    sys.stdin.read()  # until run.sh closes our stdin
    for s in socks:
        s.close()
    return 0


def cmd_latency(mode, hostport, path, n, ca):
    """One client, one connection, one request at a time: what an order waits for."""
    n = int(n)
    host = "api.coinbase.com"
    s = socket.create_connection(addr(hostport), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "tunnel":
        s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        status, _, _ = read_response(s)
        if status != 200:
            print(f"CONNECT answered {status}", file=sys.stderr)
            return 1
    if mode in ("tls", "tunnel"):
        ctx = ssl.create_default_context(cafile=ca)
        ctx.set_alpn_protocols(["http/1.1"])
        s = ctx.wrap_socket(s, server_hostname=host)
        req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cbgate-bench\r\n\r\n".encode()
    else:
        req = request_bytes(path)
    times = []
    bad = 0
    for i in range(n + 200):  # the first 200 warm up
        t0 = time.perf_counter_ns()
        s.sendall(req)
        status, _, _ = read_response(s)
        t1 = time.perf_counter_ns()
        bad += status != 200
        if i >= 200:
            times.append((t1 - t0) / 1e6)
    s.close()
    times.sort()
    print(json.dumps({
        "p50": times[len(times) // 2],
        "p99": times[min(len(times) - 1, len(times) * 99 // 100)],
        "n": len(times),
        "non200": bad,
    }))
    return 0


def cmd_startup(n, admin, proxy, path, *cmd):
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    runs = []
    for _ in range(int(n)):
        if status_or_none(admin, "/readyz") is not None or status_or_none(proxy, path) is not None:
            print(f"something already answers on {admin} or {proxy}", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = first = None
        try:
            while time.perf_counter() - t0 < 20 and p.poll() is None:
                if status_or_none(admin, "/readyz") == 200:
                    ready = (time.perf_counter() - t0) * 1e3
                    break
                time.sleep(0.0005)
            while ready is not None and time.perf_counter() - t0 < 20 and p.poll() is None:
                if status_or_none(proxy, path) == 200:
                    first = (time.perf_counter() - t0) * 1e3
                    break
                time.sleep(0.0005)
        finally:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if ready is None or first is None:
            print(f"start-up run failed (exit {p.returncode})", file=sys.stderr)
            return 1
        runs.append({"ready_ms": round(ready, 2), "first_request_ms": round(first, 2)})
        time.sleep(0.2)
    print(json.dumps(runs))
    return 0


# ---------------------------------------------------------------------------------------------
# summarize

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def to_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(text):
    out = {"non2xx": 0, "socket_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        out[f"p{pct}"] = to_ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = sum(int(x) for x in m.groups())
    return out


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def ratio(x, base):
    if x is None or not base:
        return "n/a"
    return f"{x / base:.2f}x"


def read_json(path, default=None):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def mib(kib):
    return None if kib is None else kib / 1024


def read_runs(d, name):
    """Per target, the rounds of DIR/NAME (runs.tsv or runs-c1.tsv), and their medians."""
    rows = {}
    for line in read_text(os.path.join(d, name)).splitlines():
        target, rnd, wrkfile, ticks, switches = line.split("\t")
        r = parse_wrk(read_text(os.path.join(d, wrkfile)))
        n = r["requests"]
        r["cpu_us_per_req"] = int(ticks) / os.sysconf("SC_CLK_TCK") * 1e6 / n if n else None
        r["ctxsw_per_req"] = int(switches) / n if n else None
        r["round"] = int(rnd)
        rows.setdefault(target, []).append(r)
    med = {}
    for t, rs in rows.items():
        med[t] = {
            k: median([r[k] for r in rs]) for k in ("rps", "p50", "p99", "cpu_us_per_req", "ctxsw_per_req")
        }
        med[t]["min_rps"] = min((r["rps"] or 0) for r in rs)
        med[t]["max_rps"] = max((r["rps"] or 0) for r in rs)
        med[t]["bad"] = sum(r["non2xx"] + r["socket_errors"] for r in rs)
        med[t]["rounds"] = len(rs)
    return rows, med


def read_latency(d):
    """The Python one-connection client's rounds: mode -> medians of p50 and p99 (ms)."""
    per = {}
    for line in read_text(os.path.join(d, "latency.tsv")).splitlines():
        mode, _rnd, js = line.split("\t", 2)
        try:
            per.setdefault(mode, []).append(json.loads(js))
        except ValueError:
            continue
    return {
        m: {"p50": median([r["p50"] for r in rs]), "p99": median([r["p99"] for r in rs]),
            "bad": sum(r.get("non200", 0) for r in rs)}
        for m, rs in per.items()
    }


def cmd_summarize(d):
    meta = read_json(os.path.join(d, "meta.json"), {})
    targets = meta.get("targets", [])  # [[id, label], ...]
    rows, med = read_runs(d, "runs.tsv")
    _, c1 = read_runs(d, "runs-c1.tsv")
    lat = read_latency(d)
    base = med.get("nginx", {})
    direct1 = c1.get("direct", {})

    out = []
    p = out.append
    p(f"# cbgate benchmark, {meta.get('date', '?')}")
    p("")
    p(f"Machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, {meta.get('mem', '?')} RAM; "
      f"{meta.get('kernel', '?')}. cbgate {meta.get('cbgate_version', '?')} (git {meta.get('git', '?')}), "
      f"{meta.get('nginx', '?')}, {meta.get('wrk', '?')}, Python {meta.get('python', '?')} "
      f"with coinbase-advanced-py {meta.get('sdk', '?')} and aiohttp {meta.get('aiohttp', '?')}.")
    p(f"Load: `wrk -t{meta.get('threads')} -c{meta.get('conns')} -d{meta.get('duration')}s --latency` "
      f"`GET {meta.get('path')}`, {meta.get('rounds')} rounds in the order "
      f"{' / '.join(t for t, _ in targets)} (A B A B), medians of the rounds. Pinning: {meta.get('pinning', '?')}.")
    p(f"Load average before the run: {meta.get('load_before', '?')}; after: {meta.get('load_after', '?')}.")
    p("")
    p("| proxy | req/s (median) | req/s min-max | vs nginx | p50 ms | vs nginx | p99 ms | vs nginx | proxy CPU us/req | context switches/req | non-2xx + socket errors |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t, label in targets:
        m = med.get(t)
        if not m:
            p(f"| {label} | not run | | | | | | | | | |")
            continue
        p(
            f"| {label} | {fmt(m['rps'])} | {fmt(m['min_rps'])}-{fmt(m['max_rps'])} | {ratio(m['rps'], base.get('rps'))} "
            f"| {fmt(m['p50'], 2)} | {ratio(m['p50'], base.get('p50'))} "
            f"| {fmt(m['p99'], 2)} | {ratio(m['p99'], base.get('p99'))} "
            f"| {fmt(m['cpu_us_per_req'], 1)} | {fmt(m['ctxsw_per_req'], 2)} | {m['bad']} |"
        )
    noisy = [
        label for t, label in targets
        if med.get(t, {}).get("rps") and (med[t]["max_rps"] - med[t]["min_rps"]) / med[t]["rps"] > 0.25
    ]
    if noisy:
        p("")
        p(f"**Noisy run**: req/s spread over the rounds is above 25% of the median for: {', '.join(noisy)}. "
          "Something else was using the CPU; rerun before drawing conclusions.")
    p("")
    p("Per round (req/s):")
    p("")
    p("| proxy | " + " | ".join(f"r{i}" for i in range(1, int(meta.get("rounds", 0)) + 1)) + " |")
    p("|---|" + "---:|" * int(meta.get("rounds", 0)))
    for t, label in targets:
        rs = sorted(rows.get(t, []), key=lambda r: r["round"])
        p(f"| {label} | " + " | ".join(fmt(r["rps"]) for r in rs) + " |")

    if c1:
        p("")
        p(f"One connection, one request at a time (`wrk -t1 -c1 -d{meta.get('c1_duration', '?')}s --latency`, "
          "same rounds order): the latency one order waits for, against the client going to the TLS upstream directly.")
        p("")
        p("| proxy | p50 ms | p50 vs direct | p99 ms | p99 vs direct | req/s | proxy CPU us/req | context switches/req | errors |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t, label in targets:
            m = c1.get(t)
            if not m:
                continue
            p(f"| {label} | {fmt(m['p50'], 3)} | {ratio(m['p50'], direct1.get('p50'))} | {fmt(m['p99'], 3)} "
              f"| {ratio(m['p99'], direct1.get('p99'))} | {fmt(m['rps'])} | {fmt(m['cpu_us_per_req'], 1)} "
              f"| {fmt(m['ctxsw_per_req'], 2)} | {m['bad']} |")
    if lat:
        names = {"tls": "TLS straight to the upstream", "plain": "plain HTTP to cbgate (reverse proxy)",
                 "tunnel": "through cbgate as HTTPS_PROXY (CONNECT, TLS inside: intercept mode)"}
        p("")
        p("Intercept mode, one Python client on one keep-alive connection (wrk cannot CONNECT; "
          "`helpers.py latency`), medians of the rounds:")
        p("")
        p("| path | p50 ms | p99 ms | p50 vs plain cbgate | errors |")
        p("|---|---:|---:|---:|---:|")
        for mode in ("tls", "plain", "tunnel"):
            m = lat.get(mode)
            if m:
                p(f"| {names[mode]} | {fmt(m['p50'], 3)} | {fmt(m['p99'], 3)} | "
                  f"{ratio(m['p50'], lat.get('plain', {}).get('p50'))} | {m['bad']} |")
    # Each stage against the same cbgate without it: the budget on the GET, the guard and the
    # audit log on the POSTed order (they act only on orders and other state-changing requests).
    stages = [("cbgate-es256-budget", "rate budget (a limit it never reaches), GET", "cbgate-es256"),
              ("cbgate-orders-guard", "pre-trade guard (every limit set), POST order", "cbgate-orders"),
              ("cbgate-orders-audit", "audit log (intent fsync'd before sending), POST order", "cbgate-orders")]
    if any(t in med for t, _, _ in stages):
        p("")
        p("Optional stages, each against the same cbgate without it (same run):")
        p("")
        p(f"| stage | req/s at {meta.get('conns')} connections | vs without | p50 at 1 connection | vs without | CPU us/req | vs without |")
        p("|---|---:|---:|---:|---:|---:|---:|")
        for t, what, without in stages:
            m, m1 = med.get(t, {}), c1.get(t, {})
            b, b1 = med.get(without, {}), c1.get(without, {})
            if not m:
                continue
            p(f"| {what} | {fmt(m.get('rps'))} | {ratio(m.get('rps'), b.get('rps'))} "
              f"| {fmt(m1.get('p50'), 3)} | {ratio(m1.get('p50'), b1.get('p50'))} "
              f"| {fmt(m.get('cpu_us_per_req'), 1)} | {ratio(m.get('cpu_us_per_req'), b.get('cpu_us_per_req'))} |")
        orders = med.get("cbgate-orders", {})
        if orders:
            p("")
            p(f"The order baseline (cbgate ES256, POST order, neither stage): {fmt(orders.get('rps'))} req/s, "
              f"p50 {fmt(c1.get('cbgate-orders', {}).get('p50'), 3)} ms at 1 connection.")

    rss = read_json(os.path.join(d, "rss.json"), {})
    p("")
    p("cbgate memory (ES256 key, a fresh process; VmRSS from /proc/PID/status):")
    p("")
    p("| state | VmRSS MiB |")
    p("|---|---:|")
    p(f"| idle after start (ready, before any request) | {fmt(mib(rss.get('idle_kib')), 1)} |")
    p(f"| idle after {fmt(rss.get('requests'))} requests at {meta.get('conns')} connections | {fmt(mib(rss.get('after_load_kib')), 1)} |")
    p(f"| {rss.get('held', '?')} open keep-alive client connections (one request each) | {fmt(mib(rss.get('held_kib')), 1)} |")
    p(f"| peak (VmHWM) over all of the above | {fmt(mib(rss.get('hwm_kib')), 1)} |")

    st = read_json(os.path.join(d, "startup.json"), {})
    p("")
    p(f"Start-up (median of {meta.get('starts')} starts; ms from exec to the admin `/readyz` 200, and to the first proxied 200):")
    p("")
    p("| key | ready ms (median) | ready ms min-max | first proxied request ms (median) |")
    p("|---|---:|---:|---:|")
    startup_med = {}
    for alg, runs in st.items():
        ready = [r["ready_ms"] for r in runs]
        first = [r["first_request_ms"] for r in runs]
        startup_med[alg] = median(ready)
        p(f"| {alg} | {fmt(median(ready), 1)} | {fmt(min(ready), 1)}-{fmt(max(ready), 1)} | {fmt(median(first), 1)} |")

    jwt = read_json(os.path.join(d, "jwt.json"), {})
    if jwt:
        p("")
        p("JWT minting (criterion `cargo bench --bench jwt`, median per token):")
        p("")
        p("| alg | cbgate mint us | jsonwebtoken::encode us | bare aws-lc-rs signature us | mint / bare |")
        p("|---|---:|---:|---:|---:|")
        for alg in ("es256", "eddsa"):
            j = jwt.get(alg, {})
            mint, enc, bare = (j.get(k) for k in ("cbgate_mint", "jsonwebtoken_encode", "bare_signature"))
            p(f"| {alg} | {fmt(mint, 2)} | {fmt(enc, 2)} | {fmt(bare, 2)} | {ratio(mint, bare)} |")

    # Targets from the issue.
    def verdict(ok):
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    def ge(x, y):
        return None if x is None or y is None else x >= y

    def le(x, y):
        return None if x is None or y is None else x <= y

    es, ed, py = med.get("cbgate-es256", {}), med.get("cbgate-ed25519", {}), med.get("sdk-python", {})
    r = lambda a, b: (a / b) if a is not None and b else None  # noqa: E731
    checks = []
    if jwt:
        for alg in ("es256", "eddsa"):
            j = jwt.get(alg, {})
            x = r(j.get("cbgate_mint"), j.get("bare_signature"))
            checks.append((f"JWT mint <= 1.15x bare signature ({alg})", f"{fmt(x, 2)}x", verdict(le(x, 1.15))))
    x = r(es.get("rps"), base.get("rps"))
    checks.append(("throughput ES256 >= 0.65x nginx", f"{fmt(x, 2)}x", verdict(ge(x, 0.65))))
    x = r(ed.get("rps"), base.get("rps"))
    checks.append(("throughput Ed25519 >= 0.85x nginx", f"{fmt(x, 2)}x", verdict(ge(x, 0.85))))
    for name, m in (("ES256", es), ("Ed25519", ed)):
        x = r(m.get("p99"), base.get("p99"))
        checks.append((f"p99 {name} <= 1.5x nginx", f"{fmt(x, 2)}x", verdict(le(x, 1.5))))
    x = r(es.get("rps"), py.get("rps"))
    checks.append(("throughput >= 10x the Python SDK proxy (ES256 vs ES256)", f"{fmt(x, 1)}x", verdict(ge(x, 10))))
    x = mib(rss.get("after_load_kib"))
    checks.append((f"RSS <= 16 MiB idle after {fmt(rss.get('requests'))} requests", f"{fmt(x, 1)} MiB", verdict(le(x, 16))))
    x = mib(rss.get("held_kib"))
    checks.append((f"RSS <= 48 MiB with {rss.get('held', '?')} open client connections", f"{fmt(x, 1)} MiB", verdict(le(x, 48))))
    for alg, v in startup_med.items():
        checks.append((f"ready within 50 ms of start ({alg})", f"{fmt(v, 1)} ms", verdict(le(v, 50))))
    ed1, es1 = c1.get("cbgate-ed25519", {}), c1.get("cbgate-es256", {})
    x = r(es1.get("p50"), direct1.get("p50"))
    checks.append(("one connection p50 ES256 <= 1.5x direct (issue 16)", f"{fmt(x, 2)}x", verdict(le(x, 1.5))))
    x = r(ed1.get("p50"), direct1.get("p50"))
    checks.append(("one connection p50 Ed25519 <= 1.35x direct (issue 16)", f"{fmt(x, 2)}x", verdict(le(x, 1.35))))
    x = r(ed.get("rps"), base.get("rps"))
    checks.append(("throughput Ed25519 >= 0.8x nginx (issue 16)", f"{fmt(x, 2)}x", verdict(ge(x, 0.8))))
    x = r(med.get("cbgate-https", {}).get("rps"), med.get("nginx-tls", {}).get("rps"))
    checks.append(("https:// listener >= 0.6x nginx terminating TLS (issue 16)", f"{fmt(x, 2)}x", verdict(ge(x, 0.6))))
    p("")
    p("Targets (issues 6 and 16):")
    p("")
    p("| target | measured | verdict |")
    p("|---|---:|---|")
    for name, got, v in checks:
        p(f"| {name} | {got} | {v} |")

    info = med.get("cbgate-es256-info", {})
    if info.get("rps") and es.get("rps"):
        p("")
        p(f"Logging: with `log.level = \"info\"` (the default; one line per request, stderr to a file) "
          f"cbgate ES256 serves {info['rps'] / es['rps']:.2f}x the requests of `warn` "
          f"({fmt(info['rps'])} vs {fmt(es['rps'])} req/s), p99 {fmt(info['p99'], 2)} vs {fmt(es['p99'], 2)} ms, "
          f"CPU {fmt(info['cpu_us_per_req'], 1)} vs {fmt(es['cpu_us_per_req'], 1)} us/req.")

    prof = read_text(os.path.join(d, "profile.md")).strip()
    if prof:
        p("")
        p(prof)
    print("\n".join(out))
    return 0


README_BEGIN = "<!-- BENCH-TABLE:BEGIN (bench/run.sh writes this table) -->"
README_END = "<!-- BENCH-TABLE:END -->"


def cmd_readme(d, readme, results):
    """README's performance table: one row per target, both loads, from this run."""
    meta = read_json(os.path.join(d, "meta.json"), {})
    _, med = read_runs(d, "runs.tsv")
    _, c1 = read_runs(d, "runs-c1.tsv")
    base, direct1 = med.get("nginx", {}), c1.get("direct", {})
    out = [README_BEGIN, "",
           f"`bench/run.sh` on {meta.get('date', '?')} ({meta.get('cores', '?')} cores, {meta.get('cpu', '?')}; "
           f"cbgate git {meta.get('git', '?')}; {meta.get('rounds')} rounds, A B A B; full report in "
           f"[`{results}`]({results})):", "",
           f"| proxy | 1 connection p50 ms | vs direct | p99 ms | {meta.get('conns')} connections req/s | vs nginx | CPU µs/req |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for t, label in meta.get("targets", []):
        m, m1 = med.get(t, {}), c1.get(t, {})
        if not m and not m1:
            continue
        out.append(f"| {label} | {fmt(m1.get('p50'), 3)} | {ratio(m1.get('p50'), direct1.get('p50'))} "
                   f"| {fmt(m1.get('p99'), 3)} | {fmt(m.get('rps'))} | {ratio(m.get('rps'), base.get('rps'))} "
                   f"| {fmt(m.get('cpu_us_per_req'), 1)} |")
    out += ["", README_END]
    text = read_text(readme)
    a, b = text.find(README_BEGIN), text.find(README_END)
    if a < 0 or b < a:
        print(f"{readme} has no {README_BEGIN} ... {README_END} markers", file=sys.stderr)
        return 1
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text[:a] + "\n".join(out) + text[b + len(README_END):])
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    fn = {
        "get": cmd_get,
        "wait": cmd_wait,
        "hold": cmd_hold,
        "startup": cmd_startup,
        "latency": cmd_latency,
        "readme": cmd_readme,
        "summarize": cmd_summarize,
    }.get(cmd)
    if fn is None:
        print(__doc__, file=sys.stderr)
        return 2
    return fn(*args) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
