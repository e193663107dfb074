"""List accounts, place a small limit order and cancel it, through cbgate.

cbgate signs every request with a fresh JWT, so this script holds no key and builds no token:
it talks plain HTTP to http://127.0.0.1:8750 where it used to talk to https://api.coinbase.com.

    python3 -m pip install -r requirements.txt
    python3 trade.py

Environment: CBGATE_URL (default http://127.0.0.1:8750); CBGATE_TOKEN_FILE, a file whose
content is sent as the `cbgate-token` header (needed when cbgate listens beyond loopback).

Against a real account this places a real order: a post-only limit buy far below the market
(it cannot fill; Coinbase refuses rather than fills a post-only order that would cross), which
is cancelled at once. Edit the constants below for another product or size.
"""
import json
import os
import sys
import uuid

import requests

BASE = os.environ.get("CBGATE_URL", "http://127.0.0.1:8750").rstrip("/")
PRODUCT_ID = "BTC-USD"
BASE_SIZE = "0.0001"  # BTC
LIMIT_PRICE = "10000.00"  # USD: far below the market

session = requests.Session()
if os.environ.get("CBGATE_TOKEN_FILE"):
    with open(os.environ["CBGATE_TOKEN_FILE"], encoding="utf-8") as f:
        session.headers["cbgate-token"] = f.read().strip()


def call(method, path, **kwargs):
    """One request through cbgate; exits with a clear line on any non-200 answer."""
    resp = session.request(method, BASE + path, timeout=30, **kwargs)
    if resp.status_code != 200:
        # cbgate's own refusals carry x-cbgate-error; everything else came from Coinbase.
        code = resp.headers.get("x-cbgate-error")
        who = f"cbgate ({code})" if code else "Coinbase"
        sys.exit(f"{method} {path}: HTTP {resp.status_code} from {who}: {resp.text}")
    return resp.json()


# 1. List accounts.
accounts = call("GET", "/api/v3/brokerage/accounts", params={"limit": 250})
for account in accounts["accounts"]:
    balance = account["available_balance"]
    print(f"account {account['currency']:>6} {balance['value']:>20} {account['name']}")

# 2. Place a small post-only limit order (good till cancelled).
order = {
    "client_order_id": str(uuid.uuid4()),
    "product_id": PRODUCT_ID,
    "side": "BUY",
    "order_configuration": {
        "limit_limit_gtc": {"base_size": BASE_SIZE, "limit_price": LIMIT_PRICE, "post_only": True}
    },
}
placed = call("POST", "/api/v3/brokerage/orders", json=order)
if not placed.get("success"):
    sys.exit("order refused: " + json.dumps(placed.get("error_response", placed)))
order_id = placed["success_response"]["order_id"]
print(f"placed order {order_id} (client_order_id {order['client_order_id']})")

# 3. Cancel it.
cancelled = call("POST", "/api/v3/brokerage/orders/batch_cancel", json={"order_ids": [order_id]})
result = cancelled["results"][0]
if not result.get("success"):
    sys.exit(f"cancel of {order_id} failed: {result.get('failure_reason')}")
print(f"cancelled order {result['order_id']}")
