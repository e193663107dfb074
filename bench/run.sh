#!/usr/bin/env bash
# cbgate benchmark (issue 6): cbgate against nginx forwarding without signing, and against the
# proxy a user writes with the official Python SDK, all on loopback in front of one TLS
# "Coinbase" (nginx with a test CA). Prints one table and writes it to bench/results-<date>.md.
#
# Run as root on a Debian machine (it installs what it needs with apt-get), from anywhere:
#     bash bench/run.sh
# Knobs (environment): ROUNDS=5 DURATION=10 CONNS=32 THREADS=2 STARTS=10 HOLD=1000
#     RSS_REQUESTS=100000 PROFILE=1 JWT_BENCH=1 BASE_PORT=18400 KEEP_TMP= C1_DURATION=5
#     LAT_REQUESTS=3000 README=1 (regenerate README's performance table between its markers)
#     ONLY="direct nginx ..." (only these targets) BENCH_BIN= (measure this binary, no build)
#     WRK_CPUS= SERVER_CPUS=   (taskset CPU lists; empty: no pinning, the default)
# See bench/README.md for what each column means and the caveats.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
STARTS=${STARTS:-10}
HOLD=${HOLD:-1000}
RSS_REQUESTS=${RSS_REQUESTS:-100000}
PROFILE=${PROFILE:-1}
PROF_DURATION=${PROF_DURATION:-15}
JWT_BENCH=${JWT_BENCH:-1}
BASE_PORT=${BASE_PORT:-18400}
WRK_CPUS=${WRK_CPUS:-}
SERVER_CPUS=${SERVER_CPUS:-}
C1_DURATION=${C1_DURATION:-5}
LAT_REQUESTS=${LAT_REQUESTS:-3000}
README_TABLE=${README:-1}
REQ_PATH=/api/v3/brokerage/accounts
# The order targets POST this (bench/post_order.lua): the guard and the audit log act on orders.
ORDER_PATH=/api/v3/brokerage/orders
ORDER_BODY='{"client_order_id":"bench-1","product_id":"BTC-USD","side":"BUY","order_configuration":{"limit_limit_gtc":{"base_size":"0.001","limit_price":"10000","post_only":true}}}'

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
VENV=${BENCH_VENV:-$TARGET_DIR/bench-venv}
STAMP=$(date +%Y-%m-%d)
RESULTS=$BENCH_DIR/results-$STAMP.md

UP_PORT=$((BASE_PORT + 43))     # TLS "Coinbase" (nginx), HTTP/1.1
UP2_PORT=$((BASE_PORT + 44))    # the same, offering h2 too (ALPN)
NGX_PORT=$((BASE_PORT + 80))    # nginx reverse proxy, no signing
NGXTLS_PORT=$((BASE_PORT + 81)) # the same nginx, terminating TLS from the client
ES_PORT=$((BASE_PORT + 50))     # cbgate, ES256 key (admin +1)
ED_PORT=$((BASE_PORT + 52))     # cbgate, Ed25519 key (admin +1)
INFO_PORT=$((BASE_PORT + 54))   # cbgate, ES256 key, log.level=info (admin +1)
SHARED_PORT=$((BASE_PORT + 56)) # cbgate, ES256 key, runtime.model = "shared" (admin +1)
HTTPS_PORT=$((BASE_PORT + 58))  # cbgate, ES256 key, https:// listener (admin +1)
FRESH_PORT=$((BASE_PORT + 60))  # fresh cbgate for memory, start-up and profile (admin +1)
BUDGET_PORT=$((BASE_PORT + 62)) # cbgate, ES256 key, rate budget on (admin +1)
H2_PORT=$((BASE_PORT + 64))     # cbgate, ES256 key, h2 to the upstream (admin +1)
ICPT_PORT=$((BASE_PORT + 66))   # cbgate, ES256 key, intercept mode (admin +1)
ORD_PORT=$((BASE_PORT + 68))    # cbgate, ES256 key, orders (POST), no guard, no audit (admin +1)
GUARD_PORT=$((BASE_PORT + 70))  # the same with the pre-trade guard (admin +1)
AUDIT_PORT=$((BASE_PORT + 72))  # the same with the audit log (admin +1)
PY_PORT=$((BASE_PORT + 90))     # Python SDK + aiohttp proxy

# The proxies under load, in the order of every round (A B A B ...), with their labels.
# `direct` is wrk against the TLS upstream itself: what a client that signs for itself waits for.
TARGETS=(direct nginx cbgate-es256 cbgate-ed25519 cbgate-es256-shared cbgate-es256-h2
  cbgate-es256-budget cbgate-es256-info nginx-tls cbgate-https sdk-python
  cbgate-orders cbgate-orders-guard cbgate-orders-audit)
if [ -n "${ONLY:-}" ]; then read -r -a TARGETS <<<"$ONLY"; fi
declare -A LABEL=(
  [direct]="client -> TLS upstream directly (no proxy)"
  [nginx]="nginx proxy_pass, no signing"
  [cbgate-es256]="cbgate ES256"
  [cbgate-ed25519]="cbgate Ed25519"
  [cbgate-es256-shared]="cbgate ES256, runtime.model=shared"
  [cbgate-es256-h2]="cbgate ES256, h2 to the upstream"
  [cbgate-es256-budget]="cbgate ES256, rate budget on"
  [cbgate-es256-info]="cbgate ES256, log.level=info"
  [nginx-tls]="nginx terminating TLS + proxy_pass, no signing"
  [cbgate-https]="cbgate ES256, https:// listener"
  [sdk-python]="Python SDK jwt_generator + aiohttp (ES256)"
  [cbgate-orders]="cbgate ES256, POST order"
  [cbgate-orders-guard]="cbgate ES256, POST order, pre-trade guard on"
  [cbgate-orders-audit]="cbgate ES256, POST order, audit log on (fsync)"
)
declare -A PORT=(
  [direct]=$UP_PORT [nginx]=$NGX_PORT [cbgate-es256]=$ES_PORT [cbgate-ed25519]=$ED_PORT
  [cbgate-es256-shared]=$SHARED_PORT [cbgate-es256-h2]=$H2_PORT [cbgate-es256-budget]=$BUDGET_PORT
  [cbgate-es256-info]=$INFO_PORT [nginx-tls]=$NGXTLS_PORT [cbgate-https]=$HTTPS_PORT
  [sdk-python]=$PY_PORT [cbgate-icpt]=$ICPT_PORT
  [cbgate-orders]=$ORD_PORT [cbgate-orders-guard]=$GUARD_PORT [cbgate-orders-audit]=$AUDIT_PORT
)
# Targets whose requests are orders: their path, and wrk's script that POSTs the order.
declare -A ORDERS=([cbgate-orders]=1 [cbgate-orders-guard]=1 [cbgate-orders-audit]=1)
WRK_S() { [ -n "${ORDERS[$1]:-}" ] && echo "-s $BENCH_DIR/post_order.lua" || true; }
declare -A SCHEME=([direct]=https [nginx-tls]=https [cbgate-https]=https)
# The cbgate processes (each with its admin listener on PORT + 1).
CBGATES=(cbgate-es256 cbgate-ed25519 cbgate-es256-shared cbgate-es256-h2 cbgate-es256-budget
  cbgate-es256-info cbgate-https cbgate-icpt cbgate-orders cbgate-orders-guard cbgate-orders-audit)

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages with apt-get and raises limits)"

# ------------------------------------------------------------------------------------------
# Packages: only what is missing, from Debian.
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v pgrep >/dev/null 2>&1 || need+=(procps)
command -v lscpu >/dev/null 2>&1 || need+=(util-linux)
if [ -x /usr/bin/python3 ]; then
  PY=/usr/bin/python3
else
  PY=$(command -v python3 || true)
  [ -n "$PY" ] || need+=(python3)
fi
# Debian ships venv's ensurepip separately.
if [ -z "${PY:-}" ] || ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need+=(python3-venv)
fi
if [ "$PROFILE" = 1 ]; then
  command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
PY=${PY:-/usr/bin/python3}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
command -v cargo >/dev/null 2>&1 || die "cargo not found: cbgate needs a Rust toolchain (1.88+) and a C compiler"
# linux-perf is optional (a kernel/user split of where the time goes); never fatal.
if [ "$PROFILE" = 1 ] && ! command -v perf >/dev/null 2>&1; then
  apt-get install -y -q --no-install-recommends linux-perf >/dev/null 2>&1 || true
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
[ "$(ulimit -n)" -ge $((HOLD + 256)) ] || die "open-file limit $(ulimit -n) is too low for $HOLD connections"

# ------------------------------------------------------------------------------------------
# Build. The shared target dir may be locked by another build: cargo waits for it.
cd "$REPO"
if [ -n "${BENCH_BIN:-}" ]; then
  # A binary built elsewhere (another commit's release build); no build here.
  CBGATE=$BENCH_BIN
else
  log "cargo build --release --locked"
  cargo build --release --locked
  CBGATE=$TARGET_DIR/release/cbgate
fi
CBGATE_PROF=
if [ "$PROFILE" = 1 ]; then
  # The release profile strips symbols. The profiled binary is the same build with symbols and
  # line tables, in its own profile directory so the release artifacts stay untouched.
  log "cargo build --profile benchprof (release + symbols, for the profile)"
  CARGO_PROFILE_BENCHPROF_INHERITS=release CARGO_PROFILE_BENCHPROF_STRIP=false \
    CARGO_PROFILE_BENCHPROF_DEBUG=line-tables-only \
    cargo build --profile benchprof --locked --bin cbgate
  CBGATE_PROF=$TARGET_DIR/benchprof/cbgate
fi

# ------------------------------------------------------------------------------------------
# Work dir, process bookkeeping, clean-up.
T=$(mktemp -d /tmp/cbgate-bench.XXXXXX)
chmod 755 "$T"
R=$T/results
mkdir -p "$R/wrk"
declare -A PID=()
HOLD_FD_OPEN=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$HOLD_FD_OPEN" = 1 ]; then exec 9>&-; fi
  local p
  for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PID[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP_TMP:-}" ]; then
    echo "bench: kept $T" >&2
  else
    rm -rf "$T"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pin() { # pin CPUS cmd...: run cmd under taskset when CPUS is set
  local cpus=$1; shift
  if [ -n "$cpus" ]; then taskset -c "$cpus" "$@"; else "$@"; fi
}

start() { # start NAME cmd...: background process, log in $T/NAME.log; PID[NAME] is its pid
  local name=$1; shift
  # No function or subshell in between, so $! is the server itself (taskset execs it).
  if [ -n "$SERVER_CPUS" ]; then
    taskset -c "$SERVER_CPUS" "$@" >"$T/$name.log" 2>&1 &
  else
    "$@" >"$T/$name.log" 2>&1 &
  fi
  PID[$name]=$!
}

stop() { # stop NAME: SIGTERM and wait
  local name=$1 p=${PID[$1]:-}
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  unset "PID[$name]"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # wait_port PORT: until something accepts on it (10 s)
  local _
  for _ in $(seq 200); do
    port_free "$1" || return 0
    sleep 0.05
  done
  die "nothing listens on 127.0.0.1:$1"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

ticks() { # ticks PID...: user + system CPU ticks of these processes, all threads
  local f=() p
  for p in "$@"; do f+=("/proc/$p/stat"); done
  cat "${f[@]}" | awk '{ s += $14 + $15 } END { print s + 0 }'
}

ctxsw() { # ctxsw PID...: voluntary + involuntary context switches, all threads
  local p
  for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null || true; done |
    awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }'
}

proxy_pids() { # the processes whose CPU a target spends
  case $1 in
    nginx | nginx-tls) echo "${PID[nginx]}" $(pgrep -P "${PID[nginx]}") ;;
    direct) echo "${PID[upstream]}" $(pgrep -P "${PID[upstream]}") ;;
    *) echo "${PID[$1]}" ;;
  esac
}

for p in $UP_PORT $UP2_PORT $NGX_PORT $NGXTLS_PORT $FRESH_PORT $((FRESH_PORT + 1)) $PY_PORT \
  $(for t in "${CBGATES[@]}"; do echo "${PORT[$t]}" $((PORT[$t] + 1)); done); do
  port_free "$p" || die "port $p is taken: set BASE_PORT to another range"
done

# ------------------------------------------------------------------------------------------
# Python SDK venv (PyPI).
if ! cmp -s "$BENCH_DIR/requirements.txt" "$VENV/bench-requirements.txt" ||
  ! "$VENV/bin/python" -c 'import aiohttp, coinbase.jwt_generator' >/dev/null 2>&1; then
  log "python venv $VENV (bench/requirements.txt)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$BENCH_DIR/requirements.txt"
  cp "$BENCH_DIR/requirements.txt" "$VENV/bench-requirements.txt"
fi

# ------------------------------------------------------------------------------------------
# Test CA, server certificate for api.coinbase.com, API keys.
log "test CA, certificates and keys in $T"
(
  cd "$T"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=cbgate bench CA" -keyout ca.key -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=api.coinbase.com" -keyout server.key -out server.csr 2>/dev/null
  printf '%s\n' "subjectAltName=DNS:api.coinbase.com" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" >server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile server.ext -out server.pem 2>/dev/null
  # ES256: a P-256 key in SEC1 PEM, as the CDP portal's JSON has it.
  openssl ecparam -name prime256v1 -genkey -noout -out es256.pem
  # Ed25519: base64 of seed || public key (64 bytes), the portal's current format. The last 32
  # bytes of the PKCS#8 DER are the seed, of the SPKI DER the public key.
  openssl genpkey -algorithm ed25519 -out ed25519.pem
  { openssl pkey -in ed25519.pem -outform DER | tail -c 32
    openssl pkey -in ed25519.pem -pubout -outform DER | tail -c 32; } | base64 -w0 >ed25519.b64
  umask 077
  "$PY" - <<'EOF'
import json
name = "organizations/00000000-0000-4000-8000-000000000000/apiKeys/11111111-1111-4111-8111-111111111111"
for src, dst in (("es256.pem", "es256.json"), ("ed25519.b64", "ed25519.json")):
    with open(src) as f:
        secret = f.read().strip() + ("\n" if src.endswith(".pem") else "")
    with open(dst, "w") as f:
        json.dump({"name": name, "privateKey": secret}, f)
EOF
  chmod 600 es256.json ed25519.json server.key
)

# A fixed ~300-byte Advanced Trade accounts answer.
BODY='{"accounts":[{"uuid":"8bfc20d7-f7c6-4422-bf07-8243ca4169fe","name":"BTC Wallet","currency":"BTC","available_balance":{"value":"0.00042000","currency":"BTC"},"default":true,"active":true,"created_at":"2021-05-31T09:59:59.000Z","type":"ACCOUNT_TYPE_CRYPTO","ready":true,"hold":{"value":"0","currency":"BTC"}}],"has_next":false,"cursor":"","size":1}'

# ------------------------------------------------------------------------------------------
# nginx: the TLS upstream and the plain reverse proxy.
mkdir -p "$T/up" "$T/ngx"
cat >"$T/up.conf" <<EOF
worker_processes auto;
daemon off;
pid $T/up/nginx.pid;
error_log $T/up/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $T/up/body;
  proxy_temp_path $T/up/proxy;
  fastcgi_temp_path $T/up/fastcgi;
  uwsgi_temp_path $T/up/uwsgi;
  scgi_temp_path $T/up/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  # Tells the bench whether a request arrived signed (cbgate, the SDK proxy) or not (nginx).
  map \$http_authorization \$bench_signed { "" "no"; default "yes"; }
  server {
    listen 127.0.0.1:$UP_PORT ssl;
    server_name api.coinbase.com;
    ssl_certificate $T/server.pem;
    ssl_certificate_key $T/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:1m;
    location / {
      default_type application/json;
      add_header x-bench-signed \$bench_signed always;
      return 200 '$BODY';
    }
  }
  server {
    listen 127.0.0.1:$UP2_PORT ssl http2;
    server_name api.coinbase.com;
    ssl_certificate $T/server.pem;
    ssl_certificate_key $T/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    http2_max_requests 100000000;
    location / {
      default_type application/json;
      add_header x-bench-signed \$bench_signed always;
      return 200 '$BODY';
    }
  }
}
EOF
cat >"$T/ngx.conf" <<EOF
worker_processes auto;
daemon off;
pid $T/ngx/nginx.pid;
error_log $T/ngx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $T/ngx/body;
  proxy_temp_path $T/ngx/proxy;
  fastcgi_temp_path $T/ngx/fastcgi;
  uwsgi_temp_path $T/ngx/uwsgi;
  scgi_temp_path $T/ngx/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  upstream coinbase {
    server 127.0.0.1:$UP_PORT;
    keepalive 64;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$NGX_PORT;
    listen 127.0.0.1:$NGXTLS_PORT ssl;
    ssl_certificate $T/server.pem;
    ssl_certificate_key $T/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass https://coinbase;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host api.coinbase.com;
      proxy_ssl_server_name on;
      proxy_ssl_name api.coinbase.com;
      proxy_ssl_verify on;
      proxy_ssl_verify_depth 2;
      proxy_ssl_trusted_certificate $T/ca.pem;
      proxy_ssl_session_reuse on;
      proxy_ssl_protocols TLSv1.2 TLSv1.3;
    }
  }
}
EOF

cbgate_conf() { # cbgate_conf FILE PORT KEYJSON LEVEL [EXTRA TOML (tables, appended)]
  # The rate budget is off (Coinbase's 30/s would throttle the load) unless EXTRA turns it on.
  # SCHEME_OF=https:// makes the listener an https:// one; UP_PROTOCOL and UPSTREAM_AT choose
  # what the upstream connections offer (ALPN) and which upstream port they reach.
  cat >"$1" <<EOF
listen = ["${SCHEME_OF:-}127.0.0.1:$2"]
admin_listen = "127.0.0.1:$(($2 + 1))"
max_connections = 2048
state_dir = "$T/state-$2"
[key]
file = "$T/$3"
[policy]
permission = "${PERMISSION:-view}"
[upstream]
ca_file = "$T/ca.pem"
protocol = "${UP_PROTOCOL:-http1}"
[upstream.resolve]
"api.coinbase.com" = "127.0.0.1:${UPSTREAM_AT:-$UP_PORT}"
[log]
level = "$4"
${5:-[budget]
enabled = false}
EOF
}
cbgate_conf "$T/es256.toml" "$ES_PORT" es256.json warn
cbgate_conf "$T/ed25519.toml" "$ED_PORT" ed25519.json warn
cbgate_conf "$T/es256-info.toml" "$INFO_PORT" es256.json info
cbgate_conf "$T/es256-shared.toml" "$SHARED_PORT" es256.json warn '[budget]
enabled = false
[runtime]
model = "shared"'
UP_PROTOCOL=auto UPSTREAM_AT=$UP2_PORT cbgate_conf "$T/es256-h2.toml" "$H2_PORT" es256.json warn
# A budget it never reaches: the cost of the bookkeeping alone.
cbgate_conf "$T/es256-budget.toml" "$BUDGET_PORT" es256.json warn '[budget]
enabled = true
[budget.advanced_private]
rate = 100000000
burst = 100000000'
SCHEME_OF=https:// cbgate_conf "$T/https.toml" "$HTTPS_PORT" es256.json warn "[budget]
enabled = false
[tls]
cert_file = \"$T/server.pem\"
key_file = \"$T/server.key\""
cbgate_conf "$T/icpt.toml" "$ICPT_PORT" es256.json warn '[budget]
enabled = false
[intercept]
enabled = true'
# Orders: the same cbgate with the trade permission; then with each order stage.
PERMISSION=trade cbgate_conf "$T/orders.toml" "$ORD_PORT" es256.json warn
PERMISSION=trade cbgate_conf "$T/orders-guard.toml" "$GUARD_PORT" es256.json warn '[budget]
enabled = false
[guard]
products = ["BTC-USD"]
max_order_base = "1"
max_order_quote = "1000000"
order_types = ["limit"]
max_orders_per_minute = 100000000'
# The log on the same disk as everything else here; each order waits for one fsync.
PERMISSION=trade cbgate_conf "$T/orders-audit.toml" "$AUDIT_PORT" es256.json warn "[budget]
enabled = false
[audit]
file = \"$T/audit.log\""
cbgate_conf "$T/fresh-es256.toml" "$FRESH_PORT" es256.json warn
cbgate_conf "$T/fresh-ed25519.toml" "$FRESH_PORT" ed25519.json warn

# ------------------------------------------------------------------------------------------
log "starting the upstream, nginx, cbgate x${#CBGATES[@]} and the Python SDK proxy"
start upstream "$NGINX" -p "$T/up" -c "$T/up.conf" -e "$T/up/error.log"
wait_port "$UP_PORT"
start nginx "$NGINX" -p "$T/ngx" -c "$T/ngx.conf" -e "$T/ngx/error.log"
declare -A CONF=([cbgate-es256]=es256 [cbgate-ed25519]=ed25519 [cbgate-es256-info]=es256-info
  [cbgate-es256-shared]=es256-shared [cbgate-es256-h2]=es256-h2 [cbgate-es256-budget]=es256-budget
  [cbgate-https]=https [cbgate-icpt]=icpt [cbgate-orders]=orders [cbgate-orders-guard]=orders-guard
  [cbgate-orders-audit]=orders-audit)
for t in "${CBGATES[@]}"; do
  start "$t" "$CBGATE" serve --config "$T/${CONF[$t]}.toml"
done
start sdk-python "$VENV/bin/python" "$BENCH_DIR/sdk_proxy.py" --listen "127.0.0.1:$PY_PORT" \
  --key-file "$T/es256.json" --ca-file "$T/ca.pem" --resolve "api.coinbase.com=127.0.0.1:$UP_PORT"

for t in "${CBGATES[@]}"; do
  "$PY" "$BENCH_DIR/helpers.py" wait "127.0.0.1:$((PORT[$t] + 1))" /readyz 30 ||
    { cat "$T/$t.log" >&2; die "$t not ready"; }
done
URL() {
  local path=$REQ_PATH
  [ -z "${ORDERS[$1]:-}" ] || path=$ORDER_PATH
  echo "${SCHEME[$1]:-http}://127.0.0.1:${PORT[$1]}$path"
}
# curl's method and body for TARGET (an order target POSTs the order).
CURL_BODY() {
  [ -z "${ORDERS[$1]:-}" ] || printf '%s\n' -X POST -H "content-type: application/json" --data-raw "$ORDER_BODY"
}
check() { # check TARGET: 200 with the upstream's body, signed unless the target does not sign
  local t=$1 out status signed len want=yes
  case $t in direct | nginx | nginx-tls) want=no ;; esac
  local body=()
  mapfile -t body < <(CURL_BODY "$t")
  out=$(curl -sk "${body[@]}" -o /dev/null -D - -w 'CODE %{http_code} %{size_download}\n' "$(URL "$t")" | tr -d '\r')
  status=$(awk '/^CODE / {print $2}' <<<"$out")
  len=$(awk '/^CODE / {print $3}' <<<"$out")
  signed=$(awk -F': ' 'tolower($1) == "x-bench-signed" {print $2}' <<<"$out")
  if [ "$status" != 200 ] || [ "$signed" != "$want" ] || [ "$len" != "${#BODY}" ]; then
    cat "$T/$t.log" >&2 2>/dev/null || true
    die "$t answered status=$status signed=${signed:--} length=$len (want 200 $want ${#BODY})"
  fi
}
for t in "${TARGETS[@]}"; do
  mapfile -t body < <(CURL_BODY "$t")
  for _ in $(seq 100); do
    [ "$(curl -sk "${body[@]}" -o /dev/null -w '%{http_code}' "$(URL "$t")")" = 200 ] && break
    sleep 0.2
  done
  check "$t"
done

# ------------------------------------------------------------------------------------------
# Throughput and latency: warm-up, then rounds A B A B.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "warm-up, 3 s each"
for t in "${TARGETS[@]}"; do
  # shellcheck disable=SC2046 # WRK_S is empty or two words
  pin "$WRK_CPUS" wrk -t"$THREADS" -c"$CONNS" -d3s $(WRK_S "$t") "$(URL "$t")" >/dev/null
done
: >"$R/runs.tsv"
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    log "round $r/$ROUNDS: $t"
    read -r -a pids < <(proxy_pids "$t")
    before=$(ticks "${pids[@]}") sw_before=$(ctxsw "${pids[@]}")
    # shellcheck disable=SC2046
    pin "$WRK_CPUS" wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency $(WRK_S "$t") "$(URL "$t")" \
      >"$R/wrk/$t.r$r.txt"
    after=$(ticks "${pids[@]}") sw_after=$(ctxsw "${pids[@]}")
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "wrk/$t.r$r.txt" $((after - before)) \
      $((sw_after - sw_before)) >>"$R/runs.tsv"
    grep -E 'Requests/sec|Non-2xx|Socket errors' "$R/wrk/$t.r$r.txt" | sed 's/^/   /' >&2
  done
done
# One connection, one request at a time (wrk -c1): the latency one order waits for.
: >"$R/runs-c1.tsv"
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    log "one connection, round $r/$ROUNDS: $t"
    read -r -a pids < <(proxy_pids "$t")
    before=$(ticks "${pids[@]}") sw_before=$(ctxsw "${pids[@]}")
    # shellcheck disable=SC2046
    pin "$WRK_CPUS" wrk -t1 -c1 -d"${C1_DURATION}s" --latency $(WRK_S "$t") "$(URL "$t")" >"$R/wrk/$t.c1.r$r.txt"
    after=$(ticks "${pids[@]}") sw_after=$(ctxsw "${pids[@]}")
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "wrk/$t.c1.r$r.txt" $((after - before)) \
      $((sw_after - sw_before)) >>"$R/runs-c1.tsv"
  done
done
# Intercept mode (HTTPS_PROXY): wrk cannot CONNECT, so one Python client on one keep-alive
# connection measures it, against the same client sent plainly to cbgate and over TLS directly
# to the upstream; the ratios between these three are what compares.
ICPT_CA=$T/state-$ICPT_PORT/ca/ca.pem
[ -s "$ICPT_CA" ] || die "intercept cbgate made no local CA at $ICPT_CA"
: >"$R/latency.tsv"
for r in $(seq "$ROUNDS"); do
  for m in tls plain tunnel; do
    case $m in
      tls) at=127.0.0.1:$UP_PORT ca=$T/ca.pem ;;
      plain) at=127.0.0.1:$ICPT_PORT ca=- ;;
      tunnel) at=127.0.0.1:$ICPT_PORT ca=$ICPT_CA ;;
    esac
    log "python client, round $r/$ROUNDS: $m"
    printf '%s\t%s\t%s\n' "$m" "$r" \
      "$("$PY" "$BENCH_DIR/helpers.py" latency "$m" "$at" "$REQ_PATH" "$LAT_REQUESTS" "$ca")" >>"$R/latency.tsv"
  done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
for t in "${CBGATES[@]}" sdk-python; do stop "$t"; done

# ------------------------------------------------------------------------------------------
# Memory of a fresh cbgate: idle, after RSS_REQUESTS requests, with HOLD open connections.
log "memory: fresh cbgate (ES256)"
start fresh "$CBGATE" serve --config "$T/fresh-es256.toml"
"$PY" "$BENCH_DIR/helpers.py" wait "127.0.0.1:$((FRESH_PORT + 1))" /readyz 30 || die "fresh cbgate not ready"
sleep 1
IDLE_KIB=$(rss_kib "${PID[fresh]}")
# wrk sleeps for its whole -d even when every thread has stopped: count.lua marks each thread's
# end in a file, and wrk gets SIGINT (it then prints its summary) once all have.
: >"$T/count.marker"
if [ -n "$WRK_CPUS" ]; then
  taskset -c "$WRK_CPUS" wrk -t"$THREADS" -c"$CONNS" -d600s -s "$BENCH_DIR/count.lua" \
    "http://127.0.0.1:$FRESH_PORT$REQ_PATH" -- $((RSS_REQUESTS / THREADS)) "$T/count.marker" >"$R/wrk/rss.txt" &
else
  wrk -t"$THREADS" -c"$CONNS" -d600s -s "$BENCH_DIR/count.lua" \
    "http://127.0.0.1:$FRESH_PORT$REQ_PATH" -- $((RSS_REQUESTS / THREADS)) "$T/count.marker" >"$R/wrk/rss.txt" &
fi
PID[wrk]=$!
for _ in $(seq 6000); do
  [ "$(wc -l <"$T/count.marker")" -ge "$THREADS" ] && break
  kill -0 "${PID[wrk]}" 2>/dev/null || break
  sleep 0.1
done
kill -INT "${PID[wrk]}" 2>/dev/null || true
wait "${PID[wrk]}" || true
unset "PID[wrk]"
LOAD_REQS=$(awk '/requests in/ {print $1}' "$R/wrk/rss.txt")
[ "${LOAD_REQS:-0}" -ge $((RSS_REQUESTS * 9 / 10)) ] || die "the memory load run served ${LOAD_REQS:-0} requests"
sleep 1
AFTER_KIB=$(rss_kib "${PID[fresh]}")
log "memory: holding $HOLD keep-alive connections"
mkfifo "$T/hold.in"
"$PY" "$BENCH_DIR/helpers.py" hold "127.0.0.1:$FRESH_PORT" "$REQ_PATH" "$HOLD" \
  <"$T/hold.in" >"$T/hold.out" 2>&1 &
PID[hold]=$!
exec 9>"$T/hold.in"
HOLD_FD_OPEN=1
for _ in $(seq 1200); do
  grep -q '^held' "$T/hold.out" 2>/dev/null && break
  kill -0 "${PID[hold]}" 2>/dev/null || { cat "$T/hold.out" >&2; die "hold helper failed"; }
  sleep 0.1
done
grep -q "^held $HOLD non200=0" "$T/hold.out" || { cat "$T/hold.out" >&2; die "holding connections failed"; }
sleep 1
HELD_KIB=$(rss_kib "${PID[fresh]}")
HWM_KIB=$(hwm_kib "${PID[fresh]}")
exec 9>&-
HOLD_FD_OPEN=0
wait "${PID[hold]}" || true
unset "PID[hold]"
stop fresh
cat >"$R/rss.json" <<EOF
{"idle_kib": $IDLE_KIB, "requests": ${LOAD_REQS:-0}, "after_load_kib": $AFTER_KIB,
 "held": $HOLD, "held_kib": $HELD_KIB, "hwm_kib": $HWM_KIB}
EOF

# ------------------------------------------------------------------------------------------
# Start-up: exec to /readyz 200 and to the first proxied 200, STARTS times per key.
log "start-up, $STARTS starts per key"
STARTUP_ES=$("$PY" "$BENCH_DIR/helpers.py" startup "$STARTS" "127.0.0.1:$((FRESH_PORT + 1))" \
  "127.0.0.1:$FRESH_PORT" "$REQ_PATH" -- "$CBGATE" serve --config "$T/fresh-es256.toml")
STARTUP_ED=$("$PY" "$BENCH_DIR/helpers.py" startup "$STARTS" "127.0.0.1:$((FRESH_PORT + 1))" \
  "127.0.0.1:$FRESH_PORT" "$REQ_PATH" -- "$CBGATE" serve --config "$T/fresh-ed25519.toml")
printf '{"ES256": %s, "Ed25519": %s}\n' "$STARTUP_ES" "$STARTUP_ED" >"$R/startup.json"

# ------------------------------------------------------------------------------------------
# JWT minting: the criterion bench (cbgate mint vs jsonwebtoken vs the bare signature).
if [ "$JWT_BENCH" = 1 ]; then
  log "cargo bench --bench jwt"
  # The servers other than the upstream and nginx are stopped; nginx idles.
  cargo bench --locked --bench jwt -- --warm-up-time 1 --measurement-time 3 >"$R/jwt-bench.txt" 2>&1 ||
    { tail -20 "$R/jwt-bench.txt" >&2; die "cargo bench failed"; }
  "$PY" - "$TARGET_DIR/criterion" >"$R/jwt.json" <<'EOF'
import json, os, sys
root = sys.argv[1]
out = {}
for alg in ("es256", "eddsa"):
    for name in ("cbgate_mint", "jsonwebtoken_encode", "bare_signature"):
        with open(os.path.join(root, alg, name, "new", "estimates.json")) as f:
            out.setdefault(alg, {})[name] = json.load(f)["median"]["point_estimate"] / 1000.0
print(json.dumps(out))
EOF
fi

# ------------------------------------------------------------------------------------------
# Profile: where a request's CPU goes.
if [ "$PROFILE" = 1 ]; then
  PROF=$R/profile.md
  {
    echo "## Profile: where one request's CPU goes (cbgate ES256, GET $REQ_PATH)"
    echo
  } >"$PROF"
  if perf stat -e instructions true >/dev/null 2>&1; then HW_PERF=1; else HW_PERF=0; fi
  # callgrind: exact instruction counts per function (user space only), collection switched on
  # after start-up and warm-up, so the counts are those of the requests alone.
  log "profile: callgrind, ${PROF_DURATION}s at 4 connections"
  start prof valgrind --tool=callgrind --callgrind-out-file="$T/callgrind.out" --instr-atstart=no \
    "$CBGATE_PROF" serve --config "$T/fresh-es256.toml"
  "$PY" "$BENCH_DIR/helpers.py" wait "127.0.0.1:$((FRESH_PORT + 1))" /readyz 180 || die "cbgate under valgrind not ready"
  for _ in 1 2 3 4 5; do "$PY" "$BENCH_DIR/helpers.py" get "127.0.0.1:$FRESH_PORT" "$REQ_PATH" >/dev/null; done
  callgrind_control -i on "${PID[prof]}" >/dev/null
  wrk -t1 -c4 -d"${PROF_DURATION}s" "http://127.0.0.1:$FRESH_PORT$REQ_PATH" >"$R/wrk/callgrind.txt"
  callgrind_control -i off "${PID[prof]}" >/dev/null
  PROF_REQS=$(awk '/requests in/ {print $1}' "$R/wrk/callgrind.txt")
  stop prof
  callgrind_annotate --auto=no --inclusive=no --threshold=100 "$T/callgrind.out" >"$R/callgrind-self.txt" 2>/dev/null || true
  callgrind_annotate --auto=no --inclusive=yes --threshold=100 "$T/callgrind.out" >"$R/callgrind-incl.txt" 2>/dev/null || true
  "$PY" "$BENCH_DIR/profile_summary.py" callgrind "$R/callgrind-self.txt" "$R/callgrind-incl.txt" \
    "${PROF_REQS:-0}" >>"$PROF"
  # perf with the software cpu-clock event (works without a hardware PMU, as on most VMs):
  # the user/kernel split under the real load (32 connections), which callgrind cannot see.
  if command -v perf >/dev/null 2>&1 && perf record -e cpu-clock -o "$T/perf-probe.data" -- true >/dev/null 2>&1; then
    log "profile: perf record -e cpu-clock, ${PROF_DURATION}s at $CONNS connections"
    start profperf "$CBGATE_PROF" serve --config "$T/fresh-es256.toml"
    "$PY" "$BENCH_DIR/helpers.py" wait "127.0.0.1:$((FRESH_PORT + 1))" /readyz 30 || die "cbgate (benchprof) not ready"
    pin "$WRK_CPUS" wrk -t"$THREADS" -c"$CONNS" -d"$((PROF_DURATION + 2))s" "http://127.0.0.1:$FRESH_PORT$REQ_PATH" >"$R/wrk/perf.txt" &
    wrk_pid=$!
    sleep 1
    perf record -e cpu-clock -F 1999 -p "${PID[profperf]}" -o "$T/perf.data" -- sleep "$PROF_DURATION" >/dev/null 2>&1 || true
    wait "$wrk_pid" || true
    stop profperf
    perf report -i "$T/perf.data" --no-children --sort dso,sym --stdio 2>/dev/null >"$R/perf-sym.txt" || true
    "$PY" "$BENCH_DIR/profile_summary.py" perf "$R/perf-sym.txt" >>"$PROF"
  fi
  if [ "$HW_PERF" = 0 ]; then
    echo >>"$PROF"
    echo "(No hardware counters here: \`perf stat -e instructions\` is not supported, so instruction counts come from callgrind and perf samples the software cpu-clock.)" >>"$PROF"
  fi
fi

# ------------------------------------------------------------------------------------------
# The table.
SDK_VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("coinbase-advanced-py"))')
AIOHTTP_VERSION=$("$VENV/bin/python" -c 'import aiohttp; print(aiohttp.__version__)')
PINNING="none (the scheduler places wrk, the proxies and the upstream on both cores)"
if [ -n "$WRK_CPUS$SERVER_CPUS" ]; then
  PINNING="wrk on CPUs ${WRK_CPUS:-any}, servers on CPUs ${SERVER_CPUS:-any} (taskset)"
fi
TARGETS_JSON=$(for t in "${TARGETS[@]}"; do printf '%s\t%s\n' "$t" "${LABEL[$t]}"; done |
  "$PY" -c 'import json,sys; print(json.dumps([l.rstrip("\n").split("\t") for l in sys.stdin]))')
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "?")
git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || GIT_REV="$GIT_REV+local changes"
"$PY" - >"$R/meta.json" \
  date="$STAMP" cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)" cores="$(nproc)" \
  mem="$(free -h | awk '/^Mem:/ {print $2}')" kernel="Linux $(uname -r)" \
  cbgate_version="$("$CBGATE" --version | awk '{print $2}')" git="$GIT_REV" \
  nginx="$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')" \
  wrk="$(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}')" \
  python="$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')" \
  sdk="$SDK_VERSION" aiohttp="$AIOHTTP_VERSION" targets="$TARGETS_JSON" rounds="$ROUNDS" \
  duration="$DURATION" conns="$CONNS" threads="$THREADS" path="$REQ_PATH" starts="$STARTS" \
  pinning="$PINNING" load_before="$LOAD_BEFORE" load_after="$LOAD_AFTER" c1_duration="$C1_DURATION" <<'EOF'
import json, sys
meta = dict(arg.split("=", 1) for arg in sys.argv[1:])
meta["targets"] = json.loads(meta["targets"])
print(json.dumps(meta))
EOF
"$PY" "$BENCH_DIR/helpers.py" summarize "$R" >"$RESULTS"
cat "$RESULTS"
log "written to $RESULTS"
if [ "$README_TABLE" = 1 ]; then
  # README's performance table, from the same run (between its BENCH-TABLE markers).
  "$PY" "$BENCH_DIR/helpers.py" readme "$R" "$REPO/README.md" "bench/$(basename "$RESULTS")"
  log "README.md performance table regenerated"
fi
