"""The read-only dashboard: balances and portfolios, through cbgate, with the "dashboard" key.

Its identity's ceiling is view, so it cannot place an order even if it tried (it does, once,
to show the refusal).

    CBGATE_TOKEN_FILE=/etc/cbgate/tokens/dashboard.token python3 dashboard.py

Environment: CBGATE_URL (default http://127.0.0.1:8750); CBGATE_TOKEN_FILE, the file holding
this program's token (sent as the `cbgate-token` header). Python standard library only.
"""
import json
import os
import sys
import urllib.error
import urllib.request

BASE = os.environ.get("CBGATE_URL", "http://127.0.0.1:8750").rstrip("/")
with open(os.environ["CBGATE_TOKEN_FILE"], encoding="utf-8") as f:
    TOKEN = f.read().strip()


def call(method, path, body=None):
    """One request through cbgate: (status, cbgate's error code or None, JSON answer)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method)
    req.add_header("cbgate-token", TOKEN)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, None, json.load(resp)
    except urllib.error.HTTPError as e:
        # cbgate's own refusals carry x-cbgate-error; anything else came from Coinbase.
        return e.code, e.headers.get("x-cbgate-error"), json.loads(e.read() or b"{}")


def must(method, path, body=None):
    status, code, answer = call(method, path, body)
    if status != 200:
        sys.exit(f"{method} {path}: HTTP {status} ({code or 'from Coinbase'}): {answer}")
    return answer


for account in must("GET", "/api/v3/brokerage/accounts?limit=250")["accounts"]:
    balance = account["available_balance"]
    print(f"account {account['currency']:>6} {balance['value']:>20} {account['name']}")
for p in must("GET", "/api/v3/brokerage/portfolios")["portfolios"]:
    print(f"portfolio {p['uuid']} {p['type']:<10} {p['name']}")

# The refusal: a view-only identity cannot trade, whatever key it names.
order = {
    "client_order_id": "dashboard-must-not-trade",
    "product_id": "BTC-USD",
    "side": "BUY",
    "order_configuration": {"limit_limit_gtc": {"base_size": "0.0001", "limit_price": "10000.00", "post_only": True}},
}
status, code, answer = call("POST", "/api/v3/brokerage/orders", order)
if status != 403:
    sys.exit(f"the dashboard's order was not refused: HTTP {status}: {answer}")
print(f"refused as it should be: HTTP {status} {code}: {answer['message']}")
