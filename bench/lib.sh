# What the scripts in bench/ share; sourced, never run.

# nginx2-mtls's certificates in DIR: a CA (ca.pem), a server certificate for
# B (server.pem, server.key: bench-b and 127.0.0.1) and a client certificate
# for A (client.pem, client.key).
make_certs() { # dir
  local d=$1
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null || return 1
  local who
  for who in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
      -keyout "$d/$who.key" -out "$d/$who.csr" 2>/dev/null || return 1
    printf 'subjectAltName=DNS:bench-b,IP:127.0.0.1\n' > "$d/$who.ext"
    openssl x509 -req -in "$d/$who.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
      -extfile "$d/$who.ext" -out "$d/$who.pem" 2>/dev/null || return 1
  done
}

# The two-proxy chains, for the scripts that set up processes of their own.
# They need T (a temp dir), PORT0, KEEP, WEFT_BIN, PIDS=() and log().
#   upstream    : nginx on PORT0 serving a 1 KiB body (never wrapped)
#   nginx2      : nginx na on PORT0+1 -> nginx nb on PORT0+2 -> upstream
#   nginx2-mtls : nginx ta on PORT0+3 -> TLS 1.3, client certificates -> nginx tb on PORT0+4 -> upstream
#   weft-2node  : weft n1's proxy on PORT0+31 -> QUIC -> weft n2 -> upstream (the service `up`)
#   weft-local  : weft n2's proxy on PORT0+32 -> upstream
# Each proxy process runs through WRAP (a function: name cmd...), nginx
# with one process and no master, weft with --worker-threads WEFT_THREADS (1).

start() { # name cmd...: runs in the background, its pid in PID_<name>
  local name=$1; shift
  "$@" >"$T/$name.out" 2>&1 &
  PIDS+=($!); eval "PID_${name//-/_}=$!"
  disown $!   # stopped by stop_all, by pid: no job notices
}
pid_of() { local v="PID_$1"; echo "${!v}"; }
stop_all() { # the processes start started, then the temp dir unless KEEP=1
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  [ "$KEEP" = 1 ] && log "# kept $T" || rm -rf "$T"
}
wait_until() { # timeout_s description cmd...: polls, never a bare sleep
  local end=$((SECONDS + $1)) what=$2; shift 2
  while ! "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || { log "# timed out waiting for: $what"; return 1; }
    sleep 0.2
  done
}
nginx_conf() { # name server-block: one process, no master
  cat > "$T/$1.conf" <<CONF
master_process off; daemon off; worker_processes 1;
pid $T/$1.pid; error_log $T/$1.err warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 100000000; keepalive_timeout 60s;
  client_body_temp_path $T/$1.cb; proxy_temp_path $T/$1.px; fastcgi_temp_path $T/$1.fc;
  uwsgi_temp_path $T/$1.uw; scgi_temp_path $T/$1.sc;
  $2 }
CONF
}
start_chains() { # WRAP
  local wrap=$1 up=$PORT0 na=$((PORT0+1)) nb=$((PORT0+2)) ta=$((PORT0+3)) tb=$((PORT0+4)) d=$T/pki n i
  head -c 1024 /dev/zero | tr '\0' 'x' > "$T/body"
  make_certs "$d" || { log "openssl could not make certificates"; return 1; }
  local keep='proxy_http_version 1.1; proxy_set_header Connection "";'
  local pool='keepalive 64; keepalive_requests 100000000;'
  nginx_conf up "server { listen 127.0.0.1:$up; location / { root $T; try_files /body =404; } }"
  nginx_conf na "upstream b { server 127.0.0.1:$nb; $pool } server { listen 127.0.0.1:$na; location / { proxy_pass http://b; $keep } }"
  nginx_conf nb "upstream u { server 127.0.0.1:$up; $pool } server { listen 127.0.0.1:$nb; location / { proxy_pass http://u; $keep } }"
  nginx_conf ta "upstream b { server 127.0.0.1:$tb; $pool } server { listen 127.0.0.1:$ta; location / { proxy_pass https://b; $keep
    proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; proxy_ssl_name bench-b; proxy_ssl_verify on;
    proxy_ssl_certificate $d/client.pem; proxy_ssl_certificate_key $d/client.key; proxy_ssl_trusted_certificate $d/ca.pem; } }"
  nginx_conf tb "upstream u { server 127.0.0.1:$up; $pool } server { listen 127.0.0.1:$tb ssl; ssl_protocols TLSv1.3;
    ssl_certificate $d/server.pem; ssl_certificate_key $d/server.key; ssl_client_certificate $d/ca.pem; ssl_verify_client on;
    location / { proxy_pass http://u; $keep } }"
  start up nginx -p "$T" -c "$T/up.conf"
  for n in na nb ta tb; do "$wrap" "$n" nginx -p "$T" -c "$T/$n.conf"; done
  "$WEFT_BIN" init --dir "$T/cluster" >"$T/init.out" 2>&1 || { cat "$T/init.out" >&2; return 1; }
  for i in 1 2; do
    mkdir -p "$T/n$i"
    RUST_LOG=warn "$wrap" "n$i" "$WEFT_BIN" node --name "n$i" --cluster "$T/cluster" \
      --gossip "127.0.0.1:$((PORT0+10+i))" --tunnel "127.0.0.1:$((PORT0+20+i))" \
      --proxy "127.0.0.1:$((PORT0+30+i))" --admin "127.0.0.1:$((PORT0+40+i))" \
      --data-dir "$T/n$i" --socket "$T/n$i/weft.sock" --seeds "127.0.0.1:$((PORT0+11))" \
      --worker-threads "${WEFT_THREADS:-1}"
  done
  _alive() { [ "$("$WEFT_BIN" --socket "$T/n$1/weft.sock" members --json | jq '[.members[] | select(.state=="alive")] | length')" = 2 ]; }
  wait_until 120 "n1 sees 2 alive" _alive 1 && wait_until 120 "n2 sees 2 alive" _alive 2 || return 1
  "$WEFT_BIN" --socket "$T/n2/weft.sock" register up --port "$up" >/dev/null || return 1
  _listed() { "$WEFT_BIN" --socket "$T/n1/weft.sock" services --json | jq -e '.services.up // [] | any(.node=="n2")'; }
  wait_until 120 "n1 lists up on n2" _listed
}

# The tools and binaries the chain scripts need, before anything is measured.
install_missing() { # cmd:debian-package...: apt-installs the packages of the missing commands
  local need=() tool
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
  done
  ((${#need[@]})) || return 0
  log "# installing: ${need[*]}"
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}
need_oha() { # sets OHA, installing oha 1.16.0 with cargo if missing
  OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
  [ -x "$OHA" ] && return 0
  log "# building oha with cargo"
  cargo install oha --locked --version 1.16.0 >/dev/null 2>&1 || { log "cannot install oha"; return 1; }
}
need_weft() { # sets WEFT_BIN, building weft in release unless it is given
  [ -n "${WEFT_BIN:-}" ] && return 0
  (cd "$ROOT" && cargo build --release --locked -p weft) >&2 || { log "weft build failed"; return 1; }
  WEFT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/weft
}
