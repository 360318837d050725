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
