#!/usr/bin/env bash
# Checks deploy/grafana/weft.json three ways:
#  1. against Grafana's own dashboard schema (the `Dashboard` type of the
#     @grafana/schema npm package, compiled with TypeScript's strict
#     excess-property checks);
#  2. every panel query is valid PromQL (promtool check rules);
#  3. every metric a query names is one weft exports.
# Usage: deploy/grafana/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
dashboard=$PWD/deploy/grafana/weft.json
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. Grafana's schema.
(
  cd "$tmp"
  npm init -y >/dev/null
  npm install --no-audit --no-fund --silent typescript@5.9.3 @grafana/schema@13.2.3
  node -e '
    const fs = require("fs");
    const d = fs.readFileSync(process.argv[1], "utf8");
    fs.writeFileSync("check.ts",
      `import type { Dashboard } from "@grafana/schema";\nexport const dashboard: Dashboard = ${d};\n`);
  ' "$dashboard"
  npx tsc --noEmit --strict --skipLibCheck --module esnext --moduleResolution bundler --target es2022 check.ts
)
echo "deploy/grafana/weft.json: matches @grafana/schema's Dashboard"

# 2. PromQL, with Grafana's variables as a query would see them.
jq -r '.panels[].targets[]?.expr' "$dashboard" \
  | sed -e 's/\$__rate_interval/1m/g' -e 's/\$instance/.*/g' -e 's/\$service/.*/g' > "$tmp/exprs"
{
  echo "groups:"
  echo "  - name: weft-dashboard"
  echo "    rules:"
  n=0
  while IFS= read -r expr; do
    n=$((n + 1))
    printf '      - record: weft:dashboard_query_%d\n        expr: %s\n' "$n" "$(jq -Rn --arg e "$expr" '$e')"
  done < "$tmp/exprs"
} > "$tmp/rules.yaml"
promtool check rules "$tmp/rules.yaml" >/dev/null
echo "deploy/grafana/weft.json: $(wc -l < "$tmp/exprs") queries are valid PromQL"

# 3. The metrics exist: each one the queries name is described by the node
# (node/src/node.rs) or drawn at scrape time (runtime/src/state_metrics.rs).
# Counters with labels appear in /metrics only once they count, so an idle
# node's output cannot settle this.
exported=$(grep -ozE '(describe_(counter|gauge|histogram)!\(\s*|family\(\s*out,\s*)"weft_[a-z_]+"' \
  node/src/node.rs runtime/src/state_metrics.rs | tr '\0' '\n' | grep -oE 'weft_[a-z_]+' | sort -u)
missing=0
for metric in $(grep -o 'weft_[a-z_]*' "$tmp/exprs" | sed 's/_bucket$//' | sort -u); do
  if ! grep -qx "$metric" <<< "$exported"; then
    echo "deploy/grafana/weft.json: $metric is not exported by weft"
    missing=1
  fi
done
[ "$missing" = 0 ]
echo "deploy/grafana/weft.json: every metric it queries is exported"
