#!/usr/bin/env bash
# Install pm2 from npm, at the pinned PM2_VERSION below, into a local npm prefix: no global install, no root.
# Why: the node's setup (setup_gpu_box.sh) and CI (.ci/run) must run the same pm2 the tests ran, installed the same
# way. Idempotent: nothing is downloaded when that version is already there.
# Usage: scripts/install_pm2.sh                install (or check) pm2 in PM2_PREFIX
#        scripts/install_pm2.sh --print-path   print the pm2 executable's path; exit 1 when it is not installed
# Environment: PM2_PREFIX (default ${BITMIND_HOME:-~/.bitmind}/pm2), NODE_MAJOR_MIN (default 18).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The pm2 release the node is tested with (tests/test_pm2.py runs this one under the ecosystem file).
PM2_VERSION=7.0.4
PREFIX="$(pm2_prefix)"
PM2="$PREFIX/node_modules/.bin/pm2"
NODE_MAJOR_MIN=${NODE_MAJOR_MIN:-18}

# installed_version: the pm2 version in PREFIX, empty when none (read from its package.json: `pm2 -v` may start a
# daemon).
installed_version() {
  local manifest="$PREFIX/node_modules/pm2/package.json"
  [[ -f "$manifest" && -x "$PM2" ]] || return 0
  node -p "require(process.argv[1]).version" "$manifest"
}

case ${1:-} in
  --print-path)
    [[ "$(installed_version)" == "$PM2_VERSION" ]] || die "pm2 $PM2_VERSION is not installed in $PREFIX: run $0"
    echo "$PM2"
    exit 0
    ;;
  "") ;;
  *) die "unknown argument: $1 (usage: $0 [--print-path])" ;;
esac

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  die "node and npm not found: install Node.js ${NODE_MAJOR_MIN}+ (scripts/setup_gpu_box.sh does)"
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
((node_major >= NODE_MAJOR_MIN)) || die "Node.js $(node -v) is too old for pm2 $PM2_VERSION: need ${NODE_MAJOR_MIN}+"

if [[ "$(installed_version)" == "$PM2_VERSION" ]]; then
  log "ok: pm2 $PM2_VERSION at $PM2"
  exit 0
fi
log "installing pm2 $PM2_VERSION into $PREFIX"
mkdir -p "$PREFIX"
npm install --prefix "$PREFIX" --save-exact --no-audit --no-fund --loglevel=error "pm2@$PM2_VERSION"
[[ "$(installed_version)" == "$PM2_VERSION" ]] || die "npm finished but $PM2 is not pm2 $PM2_VERSION"
log "ok: pm2 $PM2_VERSION at $PM2"
