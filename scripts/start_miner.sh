#!/usr/bin/env bash
# pm2 app `bitmind_miner`: runs bitmind-miner with the settings in miner.env (documented in miner.env.example).
# Usage: scripts/start_miner.sh [extra bitmind-miner flags]   (BITMIND_ENV_FILE overrides <repo>/miner.env)
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ENV_FILE="${BITMIND_ENV_FILE:-$REPO_ROOT/miner.env}"
load_env_file "$ENV_FILE" miner
: "${AXON_PORT:=8091}" "${DETECTOR:=camo}"
require_uint AXON_PORT
[[ -z "${AXON_EXTERNAL_PORT:-}" ]] || require_uint AXON_EXTERNAL_PORT

ARGS=()
add_neuron_args
ARGS+=(--axon.port "$AXON_PORT" --neuron.detector "$DETECTOR")
add_flag_if_set --axon.external_ip AXON_EXTERNAL_IP
add_flag_if_set --axon.external_port AXON_EXTERNAL_PORT
add_switch_if_true --blacklist.force_validator_permit FORCE_VALIDATOR_PERMIT
add_flag_if_set --blacklist.min_stake MIN_STAKE
add_words EXTRA_ARGS

log "starting bitmind-miner: wallet $WALLET_NAME/$WALLET_HOTKEY, netuid $NETUID," \
  "chain $(chain_label), port $AXON_PORT, detector $DETECTOR"
exec "$(venv_bin bitmind-miner)" "${ARGS[@]}" "$@"
