// Streams your Coinbase Advanced Trade user channel (orders, fills) through cbgate, which adds a
// fresh JWT to each subscribe: this script holds no key. Needs `npm ci` (the `ws` package).
//
//   node ws_user.mjs
//
// Environment: CBGATE_WS_URL (default ws://127.0.0.1:8750/ws/user); CBGATE_WS_MAX_MESSAGES stops
// after that many messages (0 or unset: run until closed); CBGATE_TOKEN_FILE, a file whose
// content is sent as the `cbgate-token` header (needed when cbgate listens beyond loopback).
import { readFileSync } from "node:fs";
import WebSocket from "ws";

const URL = process.env.CBGATE_WS_URL ?? "ws://127.0.0.1:8750/ws/user";
const LIMIT = Number(process.env.CBGATE_WS_MAX_MESSAGES ?? "0");
const headers = {};
if (process.env.CBGATE_TOKEN_FILE) {
  headers["cbgate-token"] = readFileSync(process.env.CBGATE_TOKEN_FILE, "utf8").trim();
}

const ws = new WebSocket(URL, { headers, maxPayload: 64 * 1024 * 1024 });
ws.on("open", () => {
  for (const channel of ["user", "heartbeats"]) { // heartbeats keep a quiet connection open
    ws.send(JSON.stringify({ type: "subscribe", channel, product_ids: ["BTC-USD"] }));
  }
});
let count = 0;
ws.on("message", (data) => {
  if (LIMIT > 0 && count >= LIMIT) return;
  console.log(data.toString());
  if (++count === LIMIT) ws.close(1000);
});
ws.on("unexpected-response", (_req, res) => {
  // cbgate refused the upgrade (e.g. 401 client_unauthorized, 403 host_not_allowed).
  let body = "";
  res.on("data", (chunk) => (body += chunk));
  res.on("end", () => {
    console.error(`upgrade refused: HTTP ${res.statusCode}: ${body}`);
    process.exit(1);
  });
});
ws.on("error", (err) => {
  console.error(`websocket error: ${err.message}`);
  process.exit(1);
});
ws.on("close", (code) => process.exit(code === 1000 || code === 1005 ? 0 : 1));
