"""The trading bot: places a small post-only limit order and cancels it, with the "bot" key.

Its identity may sign only with the "bot" key and trade (never transfer); the [guard] limits
each order. It tries the ops key once, to show the refusal.

    CBGATE_TOKEN_FILE=/etc/cbgate/tokens/bot.token python3 bot.py

Environment: CBGATE_URL (default http://127.0.0.1:8750); CBGATE_TOKEN_FILE, the file holding
this program's token. Python standard library only. Against a real account this places a real
order far below the market (post-only: it cannot fill), cancelled at once.
"""
import json
import os
import sys
import urllib.error
import urllib.request
import uuid

BASE = os.environ.get("CBGATE_URL", "http://127.0.0.1:8750").rstrip("/")
with open(os.environ["CBGATE_TOKEN_FILE"], encoding="utf-8") as f:
    TOKEN = f.read().strip()


def call(method, path, body=None, key=None):
    """One request through cbgate: (status, cbgate's error code or None, JSON answer).
    `key` names the credential (cbgate-key header); unset, cbgate uses the identity's default_key."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method)
    req.add_header("cbgate-token", TOKEN)
    if key:
        req.add_header("cbgate-key", key)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, None, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-cbgate-error"), json.loads(e.read() or b"{}")


def must(method, path, body=None):
    status, code, answer = call(method, path, body)
    if status != 200:
        sys.exit(f"{method} {path}: HTTP {status} ({code or 'from Coinbase'}): {answer}")
    return answer


order = {
    "client_order_id": str(uuid.uuid4()),
    "product_id": "BTC-USD",
    "side": "BUY",
    "order_configuration": {"limit_limit_gtc": {"base_size": "0.0001", "limit_price": "10000.00", "post_only": True}},
}
placed = must("POST", "/api/v3/brokerage/orders", order)
if not placed.get("success"):
    sys.exit("order refused by Coinbase: " + json.dumps(placed.get("error_response", placed)))
order_id = placed["success_response"]["order_id"]
print(f"placed order {order_id}")
result = must("POST", "/api/v3/brokerage/orders/batch_cancel", {"order_ids": [order_id]})["results"][0]
if not result.get("success"):
    sys.exit(f"cancel of {order_id} failed: {result.get('failure_reason')}")
print(f"cancelled order {order_id}")

# The refusal: the bot may not sign with the ops key (which could move funds).
status, code, answer = call("GET", "/api/v3/brokerage/accounts", key="ops")
if status != 403 or code != "key_not_allowed":
    sys.exit(f"the bot used the ops key: HTTP {status} {code}: {answer}")
print(f"refused as it should be: HTTP {status} {code}: {answer['message']}")
