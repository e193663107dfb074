#!/usr/bin/env python3
"""The proxy a user writes themselves with the official Python SDK: the yardstick for cbgate.

Per request it builds the JWT with the SDK's own `coinbase.jwt_generator.build_rest_jwt` (as
`coinbase.rest.RESTClient` does: the key is parsed from its text on every call) and forwards the
request with one shared aiohttp ClientSession (keep-alive pool, TLS verified against --ca-file,
SNI and certificate check for api.coinbase.com). The response is read whole and sent back.

Run by bench/run.sh inside a venv holding bench/requirements.txt:

    sdk_proxy.py --listen 127.0.0.1:18090 --key-file key.json --ca-file ca.pem \
        --resolve api.coinbase.com=127.0.0.1:18443
"""

import argparse
import json
import socket
import ssl

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from aiohttp.abc import AbstractResolver
from coinbase import jwt_generator

HOST = "api.coinbase.com"

# Hop-by-hop fields (RFC 9110 7.6.1) and what the proxy sets itself.
DROP_REQUEST = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
    "proxy-authorization",
    "content-length",
}
DROP_RESPONSE = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


class PinnedResolver(AbstractResolver):
    """Sends api.coinbase.com to a fixed address (like curl --resolve); the name stays for SNI,
    the certificate check and the Host header."""

    def __init__(self, pins):
        self.pins = pins

    async def resolve(self, host, port=0, family=socket.AF_INET):
        ip, pinned_port = self.pins[host]
        return [
            {
                "hostname": host,
                "host": ip,
                "port": pinned_port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="IP:PORT")
    ap.add_argument("--key-file", required=True, help="CDP key JSON")
    ap.add_argument("--ca-file", required=True, help="PEM roots to trust upstream")
    ap.add_argument("--resolve", required=True, help="api.coinbase.com=IP:PORT")
    args = ap.parse_args()

    with open(args.key_file, encoding="utf-8") as f:
        key = json.load(f)
    key_name = key.get("name") or key["id"]
    secret = key.get("privateKey") or key["secret"]
    # Fail at start, not on the first request, when the SDK cannot use the key.
    jwt_generator.build_rest_jwt("GET api.coinbase.com/", key_name, secret)

    host, _, addr = args.resolve.partition("=")
    ip, _, port = addr.rpartition(":")
    pins = {host: (ip, int(port))}
    tls = ssl.create_default_context(cafile=args.ca_file)

    async def on_startup(app):
        app["session"] = ClientSession(
            connector=TCPConnector(
                ssl=tls, resolver=PinnedResolver(pins), limit=256, keepalive_timeout=300
            ),
            timeout=ClientTimeout(total=30),
            auto_decompress=False,
        )

    async def on_cleanup(app):
        await app["session"].close()

    async def handle(request):
        path = request.rel_url.raw_path
        uri = jwt_generator.format_jwt_uri(request.method, path)
        token = jwt_generator.build_rest_jwt(uri, key_name, secret)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in DROP_REQUEST
        }
        headers["Authorization"] = f"Bearer {token}"
        body = await request.read() if request.body_exists else None
        async with request.app["session"].request(
            request.method,
            f"https://{HOST}{request.rel_url.raw_path_qs}",
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as resp:
            payload = await resp.read()
            out = [(k, v) for k, v in resp.headers.items() if k.lower() not in DROP_RESPONSE]
            return web.Response(status=resp.status, body=payload, headers=out)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    listen_ip, _, listen_port = args.listen.rpartition(":")
    web.run_app(
        app, host=listen_ip, port=int(listen_port), access_log=None, print=None
    )


if __name__ == "__main__":
    main()
