#!/usr/bin/env bash
# The ops script: moves funds between two portfolios, with the "ops" key (transfer ceiling).
# It first shows that cbgate serves no program without a token (clients.require = true).
#
#   CBGATE_TOKEN_FILE=/etc/cbgate/tokens/ops.token bash ops.sh SOURCE_PORTFOLIO TARGET_PORTFOLIO 10 USD
#
# Environment: CBGATE_URL (default http://127.0.0.1:8750); CBGATE_TOKEN_FILE, the file holding
# this program's token (sent on standard input, never on the command line, which ps shows).
# Against a real account this moves real funds.
set -euo pipefail

BASE="${CBGATE_URL:-http://127.0.0.1:8750}"
BASE="${BASE%/}"
source_portfolio=$1 target_portfolio=$2 value=${3:-10} currency=${4:-USD}

# The refusal: no token, no identity, 401 (and nothing reaches Coinbase).
status=$(curl --silent --output /dev/null --write-out '%{http_code}' --max-time 30 \
  "$BASE/api/v3/brokerage/portfolios")
if [[ "$status" != 401 ]]; then
  echo "a request without a token was served: HTTP $status" >&2
  exit 1
fi
echo "refused as it should be: HTTP $status without a token"

call() {
  local method=$1 path=$2 body=${3:-}
  local args=(--silent --show-error --fail-with-body --max-time 30 -X "$method")
  if [[ -n "$body" ]]; then
    args+=(-H 'content-type: application/json' --data-binary "$body")
  fi
  curl "${args[@]}" -H @- "$BASE$path" <<<"cbgate-token: $(tr -d '\r\n' <"$CBGATE_TOKEN_FILE")"
}

echo "== portfolios"
call GET /api/v3/brokerage/portfolios
echo
echo "== move $value $currency from $source_portfolio to $target_portfolio"
moved=$(call POST /api/v3/brokerage/portfolios/move_funds "{
  \"funds\": {\"value\": \"$value\", \"currency\": \"$currency\"},
  \"source_portfolio_uuid\": \"$source_portfolio\",
  \"target_portfolio_uuid\": \"$target_portfolio\"
}")
echo "$moved"
if ! grep -q "\"target_portfolio_uuid\" *: *\"$target_portfolio\"" <<<"$moved"; then
  echo "move_funds failed" >&2
  exit 1
fi
echo "moved $value $currency to $target_portfolio"
