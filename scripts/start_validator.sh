#!/usr/bin/env bash
# pm2 app `bitmind_validator`: runs bitmind-validator with the settings in validator.env (see validator.env.example).
# The validator serves nothing (no axon, no inbound port): it only connects out to miners and the chain.
# Usage: scripts/start_validator.sh [extra bitmind-validator flags]   (BITMIND_ENV_FILE overrides <repo>/validator.env)
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ENV_FILE="${BITMIND_ENV_FILE:-$REPO_ROOT/validator.env}"
load_env_file "$ENV_FILE" validator

ARGS=()
add_neuron_args
add_flag_if_set --neuron.sample_size SAMPLE_SIZE
add_flag_if_set --neuron.timeout QUERY_TIMEOUT
add_flag_if_set --validator.synthetic_cache SYNTHETIC_CACHE
add_flag_if_set --validator.external_ip EXTERNAL_IP
add_words EXTRA_ARGS

log "starting bitmind-validator: wallet $WALLET_NAME/$WALLET_HOTKEY, netuid $NETUID," \
  "chain $(chain_label)"
exec "$(venv_bin bitmind-validator)" "${ARGS[@]}" "$@"
