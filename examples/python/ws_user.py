# Streams your Coinbase Advanced Trade user channel (orders, fills) through cbgate, which adds a
# fresh JWT to each subscribe: this script holds no key. Needs `pip install -r requirements.txt`.
# CBGATE_WS_URL overrides the URL; CBGATE_WS_MAX_MESSAGES stops after that many messages.
import asyncio, json, os, sys
import websockets
from websockets.exceptions import InvalidStatus

URL = os.environ.get("CBGATE_WS_URL", "ws://127.0.0.1:8750/ws/user")
LIMIT = int(os.environ.get("CBGATE_WS_MAX_MESSAGES", "0"))  # 0: run until closed

async def main():
    async with websockets.connect(URL, max_size=64 * 1024 * 1024) as ws:
        for channel in ("user", "heartbeats"):  # heartbeats keep a quiet connection open
            await ws.send(json.dumps({"type": "subscribe", "channel": channel, "product_ids": ["BTC-USD"]}))
        count = 0
        async for message in ws:
            print(message, flush=True)
            count += 1
            if count == LIMIT:
                break

try:
    asyncio.run(main())
except InvalidStatus as e:  # cbgate refused the upgrade: its JSON body says why
    body = e.response.body.decode("utf-8", "replace") if e.response.body else ""
    sys.exit(f"upgrade refused: HTTP {e.response.status_code}: {body}")
