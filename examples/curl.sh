#!/usr/bin/env bash
# List accounts, place a small limit order and cancel it, with curl through cbgate. cbgate signs
# every request with a fresh JWT: no key, no token, no openssl here.
#
#   bash examples/curl.sh
#
# Environment: CBGATE_URL (default http://127.0.0.1:8750); CBGATE_TOKEN_FILE, a file whose content
# is sent as the `cbgate-token` header (needed when cbgate listens beyond loopback). Output is
# pretty-printed with jq when it is installed, raw JSON otherwise (JQ= forces raw).
#
# Against a real account this places a real order: a post-only limit buy far below the market
# (it cannot fill), cancelled at once.
set -euo pipefail

BASE="${CBGATE_URL:-http://127.0.0.1:8750}"
BASE="${BASE%/}"
JQ="${JQ-$(command -v jq || true)}"

# One request through cbgate: fails (exit 22) on any HTTP error, printing the answer's body.
call() {
  local method=$1 path=$2 body=${3:-}
  local args=(--silent --show-error --fail-with-body --max-time 30 -X "$method")
  if [[ -n "$body" ]]; then
    args+=(-H 'content-type: application/json' --data-binary "$body")
  fi
  if [[ -n "${CBGATE_TOKEN_FILE:-}" ]]; then
    # The header comes on standard input, not on the command line (which ps shows).
    curl "${args[@]}" -H @- "$BASE$path" <<<"cbgate-token: $(tr -d '\r\n' <"$CBGATE_TOKEN_FILE")"
  else
    curl "${args[@]}" "$BASE$path"
  fi
}

show() { if [[ -n "$JQ" ]]; then "$JQ" .; else cat; echo; fi; }

# The value of a string field, with jq or (raw JSON) sed.
field() {
  if [[ -n "$JQ" ]]; then
    "$JQ" -r "$1"
  else
    sed -n "s/.*\"${1##*.}\" *: *\"\\([^\"]*\\)\".*/\\1/p"
  fi
}

echo "== accounts"
call GET "/api/v3/brokerage/accounts?limit=250" | show

echo "== place a post-only limit order"
client_order_id="curl-$(date +%s)-$RANDOM"
placed=$(call POST /api/v3/brokerage/orders "{
  \"client_order_id\": \"$client_order_id\",
  \"product_id\": \"BTC-USD\",
  \"side\": \"BUY\",
  \"order_configuration\": {
    \"limit_limit_gtc\": {\"base_size\": \"0.0001\", \"limit_price\": \"10000.00\", \"post_only\": true}
  }
}")
show <<<"$placed"
order_id=$(field .success_response.order_id <<<"$placed")
if [[ -z "$order_id" || "$order_id" == null ]]; then
  echo "order refused" >&2
  exit 1
fi
echo "placed order $order_id"

echo "== cancel it"
cancelled=$(call POST /api/v3/brokerage/orders/batch_cancel "{\"order_ids\": [\"$order_id\"]}")
show <<<"$cancelled"
if ! grep -q '"success" *: *true' <<<"$cancelled"; then
  echo "cancel of $order_id failed" >&2
  exit 1
fi
echo "cancelled order $order_id"
