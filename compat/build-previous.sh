#!/usr/bin/env bash
# Builds the previous release (the commit in compat/previous-release) once,
# from this repository's history, into target/compat/; prints the path of
# its `weft` binary. The upgrade test (tests/upgrade.rs) runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$(grep -v '^#' compat/previous-release | head -1)
out=$PWD/target/compat
bin=$out/weft-$rev
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
if ! git cat-file -e "$rev^{commit}" 2>/dev/null && [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  git fetch --quiet --unshallow 2>/dev/null || true
fi
if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
  echo "compat/build-previous.sh: commit $rev is not in this clone (a shallow clone?); fetch it to run the upgrade test" >&2
  exit 1
fi
src=$out/src-$rev
rm -rf "$src"
mkdir -p "$src"
git archive "$rev" | tar -x -C "$src"
echo "compat/build-previous.sh: building the previous release ($rev) into $out" >&2
cargo build --locked --quiet -p weft --bin weft --manifest-path "$src/Cargo.toml" --target-dir "$out/target" >&2
cp "$out/target/debug/weft" "$bin.partial"
mv "$bin.partial" "$bin"
rm -rf "$src"
echo "$bin"
