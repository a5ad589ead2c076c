#!/usr/bin/env bash
# pm2 app `bitmind_validator`: runs bitmind-validator with the settings in validator.env (see validator.env.example).
# Usage: scripts/start_validator.sh [extra bitmind-validator flags]   (BITMIND_ENV_FILE overrides <repo>/validator.env)
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ENV_FILE="${BITMIND_ENV_FILE:-$REPO_ROOT/validator.env}"
load_env_file "$ENV_FILE" validator
: "${AXON_PORT:=8092}"

ARGS=()
add_neuron_args
add_flag_if_set --neuron.sample_size SAMPLE_SIZE
add_flag_if_set --neuron.timeout QUERY_TIMEOUT
add_words EXTRA_ARGS

log "starting bitmind-validator: wallet $WALLET_NAME/$WALLET_HOTKEY, netuid $NETUID, $SUBTENSOR_NETWORK, port $AXON_PORT"
exec "$(venv_bin bitmind-validator)" "${ARGS[@]}" "$@"
