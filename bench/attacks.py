#!/usr/bin/env python3
"""Peak memory and slots of a release cbgate under the hostile-client attacks of issue 11.

    python3 bench/attacks.py [--binary target/release/cbgate] [--only NAME,...]

Each attack runs against a fresh cbgate (so VmHWM, the peak RSS, is the attack's own) in front
of a TLS "Coinbase" on loopback made here (a test CA from openssl; an HTTP/1.1 upstream with a
slow and a stalling endpoint; a WebSocket upstream). Loopback only; every loop is bounded.
Prints one markdown table; bench/README.md explains the columns. Needs openssl and the packages
of bench/attack-requirements.txt (websockets, h2); bench/attacks.sh makes the venv.
"""

import argparse
import asyncio
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
    return 0


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def make_certs(d):
    def run(*args):
        subprocess.run(args, cwd=d, check=True, capture_output=True)

    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", "/CN=attack test CA", "-keyout", "ca.key", "-out", "ca.pem")
    names = "DNS:api.coinbase.com,DNS:advanced-trade-ws.coinbase.com"
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", "/CN=api.coinbase.com", "-keyout", "server.key", "-out", "server.csr")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write(f"subjectAltName={names}\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")


class Upstream:
    """TLS HTTP/1.1 'Coinbase': /slow answers after 3 s, /stall sends headers then nothing,
    anything else answers at once. Counts the TLS connections it accepted."""

    def __init__(self, d):
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(os.path.join(d, "server.pem"), os.path.join(d, "server.key"))
        self.connections = 0
        self.open = 0

    async def handle(self, reader, writer):
        self.connections += 1
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if "/slow" in path:
                    await asyncio.sleep(3)
                if "/stall" in path:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{")
                    await writer.drain()
                    await asyncio.sleep(3600)
                body = b'{"accounts":[]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError,
                asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.ctx,
                                                 limit=1 << 20)
        return self.server.sockets[0].getsockname()[1]


async def ws_upstream(d):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(d, "server.pem"), os.path.join(d, "server.key"))

    async def echo(ws):
        async for _ in ws:
            pass

    server = await websockets.serve(echo, "127.0.0.1", 0, ssl=ctx, max_size=None)
    return server, server.sockets[0].getsockname()[1]


class Gate:
    def __init__(self, binary, d, up_port, ws_port, extra):
        self.port, self.admin = free_port(), free_port()
        cfg = os.path.join(d, f"cbgate-{self.port}.toml")
        with open(cfg, "w") as f:
            f.write(f"""listen = ["127.0.0.1:{self.port}"]
admin_listen = "127.0.0.1:{self.admin}"
clock_check_interval = "1h"
{extra}
[log]
level = "warn"
[upstream]
ca_file = "{d}/ca.pem"
[upstream.resolve]
"api.coinbase.com" = "127.0.0.1:{up_port}"
"advanced-trade-ws.coinbase.com" = "127.0.0.1:{ws_port}"
""")
        self.log = open(os.path.join(d, f"cbgate-{self.port}.log"), "w")
        self.proc = subprocess.Popen([binary, "serve", "--config", cfg], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"cbgate did not start; see {self.log.name}")
                time.sleep(0.05)

    def hwm_mib(self):
        return proc_status(self.proc.pid, "VmHWM") / 1024

    def rss_mib(self):
        return proc_status(self.proc.pid, "VmRSS") / 1024

    def fds(self):
        return fd_count(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def get_status(port, path="/api/v3/brokerage/accounts", timeout=5):
    """One plain GET; the status code, or the error text."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(4096)
            return int(data.split(b" ", 2)[1]) if data else "closed"
    except OSError as e:
        return type(e).__name__


async def hold(port, n, payload, seconds):
    """Opens n connections, sends payload on each, and reports how many cbgate closed within
    `seconds` (a slot-holding connection that is timed out is closed by cbgate)."""
    conns = []
    for _ in range(n):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(payload)
            conns.append((r, w))
        except OSError:
            break

    async def closed(r):
        try:
            while await asyncio.wait_for(r.read(65536), seconds + 5):
                pass
            return True
        except (asyncio.TimeoutError, ConnectionError):
            return False

    start = time.time()
    results = await asyncio.gather(*(closed(r) for r, _ in conns))
    took = time.time() - start
    for _, w in conns:
        w.close()
    return len(conns), sum(results), took


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def attack_preface(g, n):
    opened, closed, took = await hold(g.port, n, PREFACE, 15)
    return {"sent": f"{opened} x h2 preface only", "outcome": f"{closed} closed by cbgate in {took:.1f} s; "
            f"then a new client got {await asyncio.to_thread(get_status, g.port)}"}


async def attack_idle_h2c(g, n, seconds=30):
    """n h2c connections that complete the handshake and answer every PING (a live client),
    but send no request: only an idle timeout frees their slots."""

    async def one():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", g.port)
        except OSError:
            return None
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        w.write(c.data_to_send())
        deadline = time.time() + seconds
        try:
            while True:
                left = deadline - time.time()
                if left <= 0:
                    return False  # still open when the attack ends
                data = await asyncio.wait_for(r.read(65536), left)
                if not data:
                    return True
                events = c.receive_data(data)  # queues SETTINGS and PING acks
                if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                    return True  # GOAWAY: cbgate is closing this connection
                w.write(c.data_to_send())
        except asyncio.TimeoutError:
            return False
        except h2.exceptions.ProtocolError:
            return True  # frames after cbgate's GOAWAY
        except ConnectionError:
            return True
        finally:
            w.close()

    start = time.time()
    results = [x for x in await asyncio.gather(*(one() for _ in range(n))) if x is not None]
    took = time.time() - start
    return {"sent": f"{len(results)} x h2c that answer pings, no request",
            "outcome": f"{sum(results)} closed by cbgate in {took:.1f} s; "
                       f"then a new client got {await asyncio.to_thread(get_status, g.port)}"}


async def attack_ws_frame(g, sessions, mib):
    frame = '{"type":"x","a":[' + ",".join(["0"] * (mib * 1024 * 1024 // 2)) + "]}"

    async def one():
        try:
            async with websockets.connect(f"ws://127.0.0.1:{g.port}/ws", max_size=None,
                                          open_timeout=10, close_timeout=10,
                                          ping_interval=None) as ws:
                await ws.send(frame)
                await asyncio.wait_for(ws.recv(), 30)
                return "answered"
        except websockets.exceptions.ConnectionClosed as e:
            return f"closed {e.rcvd.code if e.rcvd else '?'}"
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            return type(e).__name__

    outcomes = await asyncio.gather(*(one() for _ in range(sessions)))
    return {"sent": f"{sessions} x one {len(frame) / 2**20:.0f} MiB text frame on /ws",
            "outcome": ", ".join(sorted(set(outcomes)))}


async def attack_fanout(g, up, conns, streams):
    peak_fds, peak_up = 0, 0

    async def client():
        r, w = await asyncio.open_connection("127.0.0.1", g.port)
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        ids = []
        for _ in range(streams):
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1"),
                                 (":path", "/api/v3/brokerage/slow")], end_stream=True)
            ids.append(sid)
        w.write(c.data_to_send())
        statuses, ended = {}, set()
        deadline = time.time() + 60
        while len(ended) < len(ids) and time.time() < deadline:
            data = await asyncio.wait_for(r.read(65536), 60)
            if not data:
                break
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    statuses[ev.stream_id] = dict(ev.headers).get(b":status", b"?").decode()
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended.add(ev.stream_id)
                    if isinstance(ev, h2.events.StreamReset):
                        statuses.setdefault(ev.stream_id, "reset")
                elif isinstance(ev, h2.events.DataReceived):
                    c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            w.write(c.data_to_send())
        w.close()
        return list(statuses.values()) + ["unanswered"] * (len(ids) - len(statuses))

    async def sample():
        nonlocal peak_fds, peak_up
        while True:
            peak_fds = max(peak_fds, g.fds())
            peak_up = max(peak_up, up.open)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    before = up.connections
    results = await asyncio.gather(*(client() for _ in range(conns)))
    sampler.cancel()
    counts = {}
    for s in (x for r in results for x in r):
        counts[s] = counts.get(s, 0) + 1
    await asyncio.sleep(1)
    return {"sent": f"{conns} h2c connections x {streams} streams to a 3 s endpoint",
            "outcome": f"statuses {counts}; upstream TLS connections opened {up.connections - before}, "
                       f"at once at most {peak_up}; cbgate fds at most {peak_fds}, "
                       f"{g.fds()} after; upstream connections still open {up.open}"}


async def attack_stall(g, up):
    start = time.time()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", g.port)
        w.write(b"GET /api/v3/brokerage/stall HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        while await asyncio.wait_for(r.read(65536), 120):
            pass
        w.close()
        outcome = f"client connection ended after {time.time() - start:.1f} s"
    except asyncio.TimeoutError:
        outcome = "still open after 120 s"
    await asyncio.sleep(0.5)
    return {"sent": "1 request whose upstream body stalls after 1 byte",
            "outcome": f"{outcome}; upstream connections still open {up.open}"}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/cbgate"))
    ap.add_argument("--only", default="")
    ap.add_argument("--conns", type=int, default=1100)
    ap.add_argument("--baseline", action="store_true",
                    help="a cbgate from before these limits existed: no per-attack settings")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    only = set(filter(None, args.only.split(",")))
    d = tempfile.mkdtemp(prefix="cbgate-attacks-")
    make_certs(d)
    up = Upstream(d)
    up_port = await up.start()
    ws_server, ws_port = await ws_upstream(d)
    # Shorter timeouts than the defaults only where a default would make the run long; each
    # row names them. Everything else is cbgate's default configuration.
    attacks = [
        ("ws_frame", 'header_read_timeout = "10s"', lambda g: attack_ws_frame(g, 4, 60)),
        ("preface", 'header_read_timeout = "2s"', lambda g: attack_preface(g, args.conns)),
        ("idle_h2c", 'idle_timeout = "3s"', lambda g: attack_idle_h2c(g, args.conns)),
        ("fanout", "", lambda g: attack_fanout(g, up, 20, 200)),
        ("stall", 'body_timeout = "3s"', lambda g: attack_stall(g, up)),
    ]
    rows = []
    for name, extra, run in attacks:
        if only and name not in only:
            continue
        if args.baseline:
            extra = ""
        g = Gate(args.binary, d, up_port, ws_port, extra)
        idle = g.rss_mib()
        try:
            res = await run(g)
        finally:
            hwm = g.hwm_mib()
            g.stop()
        rows.append((name, extra or "defaults", res["sent"], f"{idle:.1f}", f"{hwm:.1f}", res["outcome"]))
        print(f"{name}: peak RSS {hwm:.1f} MiB; {res['outcome']}", file=sys.stderr)
    ws_server.close()
    print("| attack | settings | sent | RSS idle MiB | peak RSS MiB | outcome |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    asyncio.run(main())
