#!/usr/bin/env python3
"""Peak memory of cbgate under the WebSocket memory-amplification attack.

The attack (security review, finding 1): a client opens `/ws` and sends one large text frame
`{"type":"x","a":[0,0,...]}`. Before the fix, cbgate parsed every client frame starting with `{`
into a serde_json::Value, so a 60 MiB frame took 2.2 GiB (four sessions 4.7 GiB). Now a client
message over `ws.max_client_message_bytes` (64 KiB) is refused at its frame header with 1009.

What this script does, all on 127.0.0.1:
1. makes a test CA and a certificate for advanced-trade-ws.coinbase.com (openssl CLI);
2. runs a TLS WebSocket upstream (Python `websockets`) that echoes what it gets and counts bytes;
3. starts the given cbgate binary (default target/release/cbgate; no API key: the old parse ran
   before signing, so a key changes nothing) with the CA trusted and the host resolved there;
4. reads VmHWM / VmRSS from /proc/<pid>/status when ready, then opens SESSIONS sessions at once,
   each sending one SIZE-byte frame of the shape above, and reports what each got back (close
   code or echo) and cbgate's VmHWM afterwards.

Needs Python 3 with `websockets` (bench/requirements.txt, or examples/python/requirements.txt)
and openssl. Usage:

    cargo build --release --locked
    python3 bench/attack_ws.py [--cbgate target/release/cbgate] [--size-mib 60] [--sessions 1 4]

The frame is sent with a zero masking key (allowed by RFC 6455), so the client needs no copy of
the payload beyond one chunk.
"""

import argparse
import asyncio
import base64
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

HOST = "advanced-trade-ws.coinbase.com"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_pki(d):
    def run(*args):
        subprocess.run(args, cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", "/CN=cbgate attack CA", "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={HOST}", "-keyout", "server.key", "-out", "server.csr")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("\n".join([
            f"subjectAltName=DNS:{HOST}", "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature", "extendedKeyUsage=serverAuth",
            "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid", ""]))
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.pem")


class Upstream:
    """A TLS WebSocket echo server in its own thread; counts the bytes of messages it got."""

    def __init__(self, d, port):
        self.d, self.port = d, port
        self.received = 0
        self.ready = threading.Event()
        threading.Thread(target=self._thread, daemon=True).start()
        if not self.ready.wait(10):
            sys.exit("the upstream mock did not start")

    def _thread(self):
        asyncio.run(self._main())

    async def _main(self):
        import websockets

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(self.d, "server.pem"), os.path.join(self.d, "server.key"))

        async def echo(ws):
            try:
                async for msg in ws:
                    self.received += len(msg)
                    await ws.send(msg)
            except Exception:
                pass

        async with websockets.serve(echo, "127.0.0.1", self.port, ssl=ctx, max_size=None,
                                    compression=None):
            self.ready.set()
            await asyncio.Future()


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0])  # kB
    return out


def mib(kb):
    return f"{kb / 1024:.1f} MiB"


def attack(port, size, result, i):
    """One session: upgrade, send one `size`-byte frame, report what came back."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                result[i] = "connection closed before 101"
                return
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            result[i] = "refused: " + head.split(b"\r\n")[0].decode(errors="replace")
            return
        rest = head.split(b"\r\n\r\n", 1)[1]
        prefix, suffix = b'{"type":"x","a":[', b"0]}"
        body_len = size - len(prefix) - len(suffix)
        body_len -= body_len % 2
        total = len(prefix) + body_len + len(suffix)
        # FIN + text, masked, 64-bit length, zero mask key (payload sent as is).
        s.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, total) + b"\0\0\0\0" + prefix)
        chunk = b"0," * (1 << 19)  # 1 MiB
        left = body_len
        sent_all = True
        try:
            while left > 0:
                n = min(left, len(chunk))
                s.sendall(chunk[:n])
                left -= n
            s.sendall(suffix)
        except OSError:
            sent_all = False  # cbgate closed the connection: the refusal we expect
        s.settimeout(60)
        buf = rest
        while len(buf) < 2:
            more = s.recv(65536)
            if not more:
                break
            buf += more
        if len(buf) < 2:
            result[i] = f"connection closed without a frame (sent all: {sent_all})"
            return
        opcode = buf[0] & 0x0F
        if opcode == 0x8:
            n = buf[1] & 0x7F
            while len(buf) < 2 + n:
                buf += s.recv(4096)
            code = struct.unpack("!H", buf[2:4])[0] if n >= 2 else None
            reason = buf[4:2 + n].decode(errors="replace")
            result[i] = f"close {code} {reason!r} (sent all: {sent_all})"
        else:
            result[i] = f"opcode {opcode}: the message was relayed (echo came back)"
        s.close()
    except Exception as e:  # report, do not crash the measurement
        result[i] = f"error: {e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cbgate", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "cbgate"))
    ap.add_argument("--size-mib", type=float, default=60)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--client-limit", type=int, default=None,
                    help="set ws.max_client_message_bytes (e.g. 67108864 to let the frame in and "
                         "measure the subscribe scan itself)")
    args = ap.parse_args()
    size = int(args.size_mib * 1024 * 1024)

    for sessions in args.sessions:
        with tempfile.TemporaryDirectory() as d:
            make_pki(d)
            up_port, port, admin = free_port(), free_port(), free_port()
            up = Upstream(d, up_port)
            cfg = os.path.join(d, "cbgate.toml")
            with open(cfg, "w") as f:
                f.write(f'listen = ["127.0.0.1:{port}"]\nadmin_listen = "127.0.0.1:{admin}"\n\n'
                        f'[log]\nlevel = "warn"\n\n[upstream]\nca_file = "{d}/ca.pem"\n\n'
                        f'[upstream.resolve]\n"{HOST}" = "127.0.0.1:{up_port}"\n')
                if args.client_limit is not None:
                    f.write(f"\n[ws]\nmax_client_message_bytes = {args.client_limit}\n")
            env = {k: v for k, v in os.environ.items() if not k.startswith("COINBASE_")}
            p = subprocess.Popen([args.cbgate, "serve", "--config", cfg], env=env,
                                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"))
            try:
                deadline = time.time() + 20
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        if p.poll() is not None or time.time() > deadline:
                            sys.exit("cbgate did not start:\n" + open(os.path.join(d, "log")).read())
                        time.sleep(0.05)
                idle = proc_status(p.pid)
                result = [None] * sessions
                threads = [threading.Thread(target=attack, args=(port, size, result, i))
                           for i in range(sessions)]
                t0 = time.time()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                took = time.time() - t0
                time.sleep(0.5)
                after = proc_status(p.pid)
                alive = p.poll() is None
            finally:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            print(f"## {sessions} session(s), one {args.size_mib:g} MiB frame each ({args.cbgate})")
            print(f"- cbgate idle: VmRSS {mib(idle['VmRSS'])}, VmHWM {mib(idle['VmHWM'])}")
            print(f"- after the attack ({took:.1f} s): VmHWM {mib(after['VmHWM'])} (peak), "
                  f"VmRSS {mib(after['VmRSS'])}; cbgate {'still running' if alive else 'DIED'}")
            print(f"- bytes the upstream received: {up.received}")
            for i, r in enumerate(result):
                print(f"- session {i}: {r}")
            print()


if __name__ == "__main__":
    main()
