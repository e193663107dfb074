-- wrk script: every request is an Advanced Trade limit order (POST /api/v3/brokerage/orders),
-- the body the guard reads and the audit log records. The TLS upstream answers it with 200.
-- Usage: wrk -t2 -c32 -d10s -s bench/post_order.lua http://127.0.0.1:PORT/api/v3/brokerage/orders
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"client_order_id":"bench-1","product_id":"BTC-USD","side":"BUY",'
  .. '"order_configuration":{"limit_limit_gtc":{"base_size":"0.001","limit_price":"10000","post_only":true}}}'
