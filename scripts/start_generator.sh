#!/usr/bin/env bash
# pm2 app `bitmind_generator`: the validator's background image generator (GPU), configured in validator.env
# (GENERATOR_* variables, SYNTHETIC_CACHE shared with the validator). It needs no wallet and no chain: it only
# writes the synthetic-image cache the validator reads.
# Usage: scripts/start_generator.sh [extra bitmind-generator flags]   (BITMIND_ENV_FILE overrides <repo>/validator.env)
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ENV_FILE="${BITMIND_ENV_FILE:-$REPO_ROOT/validator.env}"
load_env_file "$ENV_FILE" validator
: "${GENERATOR_DEVICE:=${DEVICE:-auto}}" "${GENERATOR_METRICS_PORT:=0}"
require_uint GENERATOR_METRICS_PORT

ARGS=(--generator.device "$GENERATOR_DEVICE" --neuron.metrics_port "$GENERATOR_METRICS_PORT")
add_flag_if_set --generator.cache_dir SYNTHETIC_CACHE
add_flag_if_set --neuron.state_dir GENERATOR_STATE_DIR
add_flag_if_set --neuron.watchdog_timeout GENERATOR_WATCHDOG_TIMEOUT
add_switch_if_true --logging.debug LOG_DEBUG
add_words GENERATOR_EXTRA_ARGS

log "starting bitmind-generator on device $GENERATOR_DEVICE"
exec "$(venv_bin bitmind-generator)" "${ARGS[@]}" "$@"
