// List accounts, place a small limit order and cancel it, through cbgate (Node 18+, built-in
// fetch). cbgate signs every request with a fresh JWT, so this script holds no key and builds no
// token: it talks plain HTTP to http://127.0.0.1:8750 instead of https://api.coinbase.com.
//
//   node trade.mjs
//
// Environment: CBGATE_URL (default http://127.0.0.1:8750); CBGATE_TOKEN_FILE, a file whose
// content is sent as the `cbgate-token` header (needed when cbgate listens beyond loopback).
//
// Against a real account this places a real order: a post-only limit buy far below the market
// (it cannot fill), cancelled at once. Edit the constants for another product or size.
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";

const BASE = (process.env.CBGATE_URL ?? "http://127.0.0.1:8750").replace(/\/+$/, "");
const PRODUCT_ID = "BTC-USD";
const BASE_SIZE = "0.0001"; // BTC
const LIMIT_PRICE = "10000.00"; // USD: far below the market

const headers = { "content-type": "application/json" };
if (process.env.CBGATE_TOKEN_FILE) {
  headers["cbgate-token"] = readFileSync(process.env.CBGATE_TOKEN_FILE, "utf8").trim();
}

function fail(message) {
  console.error(message);
  process.exit(1);
}

// One request through cbgate; exits with a clear line on any non-200 answer.
async function call(method, path, body) {
  const res = await fetch(BASE + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(30_000),
  });
  const text = await res.text();
  if (res.status !== 200) {
    // cbgate's own refusals carry x-cbgate-error; everything else came from Coinbase.
    const code = res.headers.get("x-cbgate-error");
    fail(`${method} ${path}: HTTP ${res.status} from ${code ? `cbgate (${code})` : "Coinbase"}: ${text}`);
  }
  return JSON.parse(text);
}

// 1. List accounts.
const { accounts } = await call("GET", "/api/v3/brokerage/accounts?limit=250");
for (const a of accounts) {
  console.log(`account ${a.currency.padStart(6)} ${a.available_balance.value.padStart(20)} ${a.name}`);
}

// 2. Place a small post-only limit order (good till cancelled).
const order = {
  client_order_id: randomUUID(),
  product_id: PRODUCT_ID,
  side: "BUY",
  order_configuration: {
    limit_limit_gtc: { base_size: BASE_SIZE, limit_price: LIMIT_PRICE, post_only: true },
  },
};
const placed = await call("POST", "/api/v3/brokerage/orders", order);
if (!placed.success) fail(`order refused: ${JSON.stringify(placed.error_response ?? placed)}`);
const orderId = placed.success_response.order_id;
console.log(`placed order ${orderId} (client_order_id ${order.client_order_id})`);

// 3. Cancel it.
const { results } = await call("POST", "/api/v3/brokerage/orders/batch_cancel", { order_ids: [orderId] });
if (!results[0].success) fail(`cancel of ${orderId} failed: ${results[0].failure_reason}`);
console.log(`cancelled order ${results[0].order_id}`);
