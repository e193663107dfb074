#!/usr/bin/env python3
"""Summarises a cbgate profile for bench/run.sh as markdown (standard library only).

    profile_summary.py callgrind SELF.txt INCL.txt REQUESTS
        SELF/INCL: `callgrind_annotate --inclusive=no|yes` output; REQUESTS: requests served
        while collection was on. Prints instructions per request and where they go.
    profile_summary.py perf REPORT.txt
        REPORT: `perf report --no-children --sort dso,sym --stdio` output (cpu-clock samples).
        Prints the user/kernel split and the top symbols.
"""

import re
import sys

LINE = re.compile(r"^\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)$")


def parse_callgrind(path):
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if "Auto-annotated source" in line or "User-annotated source" in line:
                break  # per-line source listings follow the function table
            m = LINE.match(line)
            if not m or "PROGRAM TOTALS" in line:
                continue
            rows.append((int(m.group(1).replace(",", "")), m.group(3)))
    return rows


def total_of(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if "PROGRAM TOTALS" in line:
                return int(line.split()[0].replace(",", ""))
    return 0


def short(name, width=110):
    # "file:function [object]" -> "function"
    name = re.sub(r"\s*\[[^\]]*\]\s*$", "", name)
    if ":" in name and name.split(":", 1)[0].count("/") > 0:
        name = name.split(":", 1)[1]
    name = name.replace("|", "\\|")
    return name if len(name) <= width else name[: width - 3] + "..."


# Inclusive costs of functions that mark a synchronous phase (first line matching each
# pattern; the file part names where the function is defined). Async phases (hyper's client and
# server, TLS reads and writes) run in whichever task polls them, so they are not listed here:
# the table by source crate below accounts for them.
PHASES = [
    ("the request handler (Proxy::handle, not counting hyper's own connection tasks)", r"src/proxy\.rs:cbgate::proxy::Proxy::handle::\{\{closure\}\} \["),
    ("  minting the JWT (jwt::mint)", r"src/jwt\.rs:cbgate::jwt::mint \["),
    ("    of which the P-256 signature (EVP_DigestSign)", r":aws_lc_\w*EVP_DigestSign \["),
    ("  header hygiene (headers::strip_hop_by_hop, both ways)", r"src/headers\.rs:cbgate::headers::strip_hop_by_hop \["),
    ("string formatting (alloc::fmt::format, all callers)", r"alloc::fmt::format::format_inner \["),
    ("random bytes (RAND_bytes, all callers: JWT nonce, request id, TLS)", r":aws_lc_\w*RAND_bytes \["),
]

CRATE = re.compile(r"/index\.crates\.io-[^/]+/([A-Za-z0-9_\-]+?)-\d+\.\d+\.\d+")

# (label, test on (source file, crate)) in order; the first match takes the row. The source
# file is where the instructions come from (inlined code keeps its own file), so this is exact
# despite LTO.
SOURCES = [
    ("aws-lc: P-256 ECDSA (field/scalar arithmetic, bignum)", lambda f, c: f.startswith("/aws-lc/") and re.search(r"p256|ec/|ecdsa|bn/|bignum|x86_64-mont", f)),
    ("aws-lc: SHA-2", lambda f, c: f.startswith("/aws-lc/") and re.search(r"sha", f)),
    ("aws-lc: AES-GCM (TLS records) and the CTR-DRBG", lambda f, c: f.startswith("/aws-lc/") and re.search(r"aes|gcm|ghash|modes/|rand/|cipher", f)),
    ("aws-lc: other", lambda f, c: f.startswith("/aws-lc/") or "aws_lc" in f),
    ("aws-lc-rs (Rust wrapper)", lambda f, c: c == "aws-lc-rs"),
    ("rustls + tokio-rustls (TLS framing)", lambda f, c: c in ("rustls", "tokio-rustls", "rustls-pki-types")),
    ("hyper, hyper-util, http, httparse, h2 (HTTP/1.1 both ways, client pool)", lambda f, c: c in ("hyper", "hyper-util", "http", "httparse", "h2", "http-body", "http-body-util", "want", "try-lock")),
    ("tokio (runtime, I/O driver, timers, channels)", lambda f, c: c in ("tokio", "mio", "futures-util", "futures-core", "futures-channel", "parking_lot", "parking_lot_core")),
    ("serde_json + base64 (JWT header and claims)", lambda f, c: c in ("serde_json", "serde_core", "serde", "base64", "itoa", "ryu")),
    ("tracing, prometheus-client (logs, metrics)", lambda f, c: c.startswith("tracing") or c.startswith("prometheus")),
    ("cbgate's own code (src/)", lambda f, c: "/src/" in f and not c and not f.startswith("/rustc/")),
    ("Rust std (fmt, alloc, collections, hashing)", lambda f, c: f.startswith("/rustc/")),
    ("glibc malloc/free", lambda f, c: "malloc/" in f),
    ("glibc memcpy/memset", lambda f, c: re.search(r"mem(move|set|cpy)", f)),
    ("other (glibc, kernel vdso, unknown)", lambda f, c: True),
]


def cmd_callgrind(self_path, incl_path, requests):
    requests = int(requests)
    total = total_of(self_path)
    out = []
    p = out.append
    if not total or not requests:
        p("callgrind: no data (the run failed or served no request).")
        print("\n".join(out))
        return 0
    per = total / requests
    p(f"callgrind (instructions executed in user space, exact; collection switched on after start-up "
      f"and warm-up): **{per:,.0f} instructions per request** over {requests:,} requests "
      f"(`wrk -t1 -c4`, cbgate under valgrind). Valgrind hides some CPU features (ADX, SHA-NI), so "
      f"aws-lc takes slower generic paths here than natively: the crypto share is somewhat "
      f"overstated; the perf samples below are native.")
    p("")
    incl = parse_callgrind(incl_path)
    p("| phase (inclusive) | instructions / request | share of all |")
    p("|---|---:|---:|")
    for label, pattern in PHASES:
        rx = re.compile(pattern)
        hit = next((ir for ir, name in incl if rx.search(name)), None)
        if hit is None:
            continue
        p(f"| {label} | {hit / requests:,.0f} | {100 * hit / total:.1f}% |")
    selfrows = parse_callgrind(self_path)
    sums = {label: 0 for label, _ in SOURCES}
    for ir, name in selfrows:
        src = name.split(":", 1)[0] if ":" in name else name
        m = CRATE.search(src)
        crate = m.group(1) if m else ""
        for label, test in SOURCES:
            if test(src, crate):
                sums[label] += ir
                break
    p("")
    p("| self cost by source (where the executed instructions come from, inlining included) | instructions / request | share of all |")
    p("|---|---:|---:|")
    for label, _ in SOURCES:
        if sums[label]:
            p(f"| {label} | {sums[label] / requests:,.0f} | {100 * sums[label] / total:.1f}% |")
    p("")
    p("Top functions by self cost:")
    p("")
    p("| instructions / request | share | function |")
    p("|---:|---:|---|")
    for ir, name in selfrows[:15]:
        p(f"| {ir / requests:,.0f} | {100 * ir / total:.1f}% | `{short(name)}` |")
    print("\n".join(out))
    return 0


PERF = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$")


def cmd_perf(path):
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = PERF.match(line)
            if m:
                rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()))
    out = []
    p = out.append
    p("")
    if not rows:
        p("perf: no samples.")
        print("\n".join(out))
        return 0
    by_dso = {}
    for pct, dso, _, _ in rows:
        by_dso[dso] = by_dso.get(dso, 0) + pct
    p("perf (`perf record -e cpu-clock`, native, cbgate's threads only, under the benchmark load of 32 "
      "connections; samples, so the kernel's share includes the network stack and scheduling that "
      "callgrind cannot see):")
    p("")
    p("| where | share of cbgate's CPU samples |")
    p("|---|---:|")
    for dso, pct in sorted(by_dso.items(), key=lambda x: -x[1])[:6]:
        p(f"| {dso} | {pct:.1f}% |")
    groups = [
        ("kernel: scheduling and wake-ups (task switch, futex, irq restore, epoll)",
         lambda d, s: d.startswith("[kernel") and re.search(r"task_switch|schedule|futex|spin_unlock_irq|epoll|wake|irqentry", s)),
        ("kernel: TCP/IP and socket I/O", lambda d, s: d.startswith("[kernel") and re.search(r"tcp|inet|ip_|skb|sock|dev_|net|readv|writev|recv|send|vfs", s)),
        ("P-256 ECDSA arithmetic (aws-lc)", lambda d, s: not d.startswith("[") and re.search(r"nistz256|p256|bignum_|bn_|ecdsa", s)),
        ("SHA-2 (aws-lc)", lambda d, s: not d.startswith("[") and re.search(r"sha256|sha512", s)),
        ("AES-GCM (aws-lc)", lambda d, s: not d.startswith("[") and re.search(r"aes|gcm|ghash", s)),
        ("malloc/free (glibc)", lambda d, s: d.startswith("libc") and re.search(r"malloc|free|realloc|consolidate|_int_", s)),
        ("memcpy/memset (glibc)", lambda d, s: d.startswith("libc") and re.search(r"memmove|memset|memcpy", s)),
    ]
    p("")
    p("| group | share of cbgate's CPU samples |")
    p("|---|---:|")
    for label, fn in groups:
        s = sum(pct for pct, dso, _, sym in rows if fn(dso, sym))
        p(f"| {label} | {s:.1f}% |")
    p("")
    p("Top symbols:")
    p("")
    p("| share | where | symbol |")
    p("|---:|---|---|")
    for pct, dso, _, sym in rows[:15]:
        p(f"| {pct:.2f}% | {dso} | `{short(sym)}` |")
    print("\n".join(out))
    return 0


def main(argv):
    if len(argv) >= 5 and argv[1] == "callgrind":
        return cmd_callgrind(argv[2], argv[3], argv[4])
    if len(argv) >= 3 and argv[1] == "perf":
        return cmd_perf(argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
