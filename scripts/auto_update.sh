#!/usr/bin/env bash
# pm2 app `bitmind_autoupdate`: polls the git remote and, when a new VERSION is released, fast-forwards this
# checkout, reinstalls it and restarts the node's pm2 apps (a failed install is rolled back; nothing restarts).
# Settings (AUTOUPDATE_* variables) come from miner.env and/or validator.env at the repository root.
# Usage: scripts/auto_update.sh [extra python -m bitmind.autoupdate flags, e.g. --once]
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEFAULT_APPS=()
for role in miner validator; do
  if [[ -f "$REPO_ROOT/$role.env" ]]; then
    ENV_FILE="$REPO_ROOT/$role.env"
    load_env_file "$ENV_FILE" "$role"
    if [[ $role == miner ]]; then
      DEFAULT_APPS+=(bitmind_miner)
    else
      DEFAULT_APPS+=(bitmind_validator bitmind_generator)
    fi
  fi
done
: "${AUTOUPDATE_INTERVAL:=300}" "${AUTOUPDATE_REMOTE:=origin}"
: "${AUTOUPDATE_APPS:=${DEFAULT_APPS[*]}}"
[[ -n "$AUTOUPDATE_APPS" ]] || die "no miner.env or validator.env in $REPO_ROOT and AUTOUPDATE_APPS unset: nothing to restart"
require_uint AUTOUPDATE_INTERVAL

ARGS=(--repo "$REPO_ROOT" --remote "$AUTOUPDATE_REMOTE" --interval "$AUTOUPDATE_INTERVAL")
add_flag_if_set --branch AUTOUPDATE_BRANCH
add_flag_if_set --install-cmd AUTOUPDATE_INSTALL_CMD
read -r -a apps <<<"$AUTOUPDATE_APPS"
pm2="$(pm2_bin)"
for app in "${apps[@]}"; do
  ARGS+=(--restart-cmd "$(printf '%q restart %q' "$pm2" "$app")")
done

log "auto-updater for apps: ${apps[*]}"
exec "$(venv_bin python)" -m bitmind.autoupdate "${ARGS[@]}" "$@"
