#!/usr/bin/env bash
# Installs the pinned Dapr JavaScript SDK (tests/js/package.json, package-lock.json) into
# target/jsenv for the JS SDK interop tests (tests/tests/js_sdk.rs). Idempotent: when the
# installed lock file matches tests/js/package-lock.json it returns at once.
# Prints the node_modules path on stdout as its last line; progress goes to stderr.
# Needs Node.js >= 18 and npm (the npm registry); fails, never skips, without them.
# Usage: bash scripts/js-env.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
env_dir=$root/target/jsenv
log() { echo "js-env: $*" >&2; }

command -v node >/dev/null 2>&1 || { log "node is not installed: install Node.js >= 18 (with npm)"; exit 1; }
command -v npm >/dev/null 2>&1 || { log "npm is not installed: install npm with Node.js"; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 18 ] || { log "node $(node --version) is too old: the Dapr JS SDK needs >= 18"; exit 1; }

mkdir -p "$root/target"
exec 9>"$root/target/.jsenv.lock"
flock 9

if [ "${1:-}" != "--force" ] && [ -d "$env_dir/node_modules/@dapr/dapr" ] \
  && cmp -s "$root/tests/js/package-lock.json" "$env_dir/package-lock.json"; then
  echo "$env_dir/node_modules"
  exit 0
fi
log "installing the pinned Dapr JS SDK into $env_dir"
rm -rf "$env_dir"
mkdir -p "$env_dir"
cp "$root/tests/js/package.json" "$root/tests/js/package-lock.json" "$env_dir/"
(cd "$env_dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
echo "$env_dir/node_modules"
