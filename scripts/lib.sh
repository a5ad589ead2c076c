#!/usr/bin/env bash
# Helpers shared by the start / setup / auto-update scripts. Sourced, never executed.
# Why: every pm2 app reads an env file, validates it and runs a console script from the project's venv; doing it
# in one place keeps the scripts short and their error messages identical.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

die() {
  echo "error: $*" >&2
  exit 1
}

log() {
  echo "[$(basename "$0")] $*"
}

# load_env_file FILE ROLE: export every variable assigned in FILE (shell syntax, e.g. WALLET_NAME=miner).
load_env_file() {
  local file=$1 role=$2
  [[ -f "$file" ]] || die "env file $file not found: cp $REPO_ROOT/scripts/$role.env.example $file and edit it"
  set -a
  # shellcheck disable=SC1090  # the operator's env file, path known only at run time
  source "$file"
  set +a
}

# require_vars NAME...: each variable must be set and non-empty.
require_vars() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "$name must be set (in ${ENV_FILE:-the env file})"
  done
}

# require_uint NAME...: each variable must hold a non-negative integer.
require_uint() {
  local name
  for name in "$@"; do
    [[ "${!name:-}" =~ ^[0-9]+$ ]] || die "$name must be a non-negative integer, got '${!name:-}'"
  done
}

# is_true VALUE: true for 1/true/yes/on (any case).
is_true() {
  [[ "${1,,}" =~ ^(1|true|yes|on)$ ]]
}

# venv_bin NAME: absolute path of an executable in the project's virtual environment.
venv_bin() {
  local path="${VENV_DIR:-$REPO_ROOT/.venv}/bin/$1"
  [[ -x "$path" ]] || die "$path not found: run scripts/setup_gpu_box.sh first (or set VENV_DIR)"
  echo "$path"
}

# add_flag_if_set FLAG NAME: append "FLAG value" to ARGS when variable NAME is non-empty.
add_flag_if_set() {
  local flag=$1 name=$2
  if [[ -n "${!name:-}" ]]; then
    ARGS+=("$flag" "${!name}")
  fi
}

# add_switch_if_true FLAG NAME: append FLAG to ARGS when variable NAME is true.
add_switch_if_true() {
  local flag=$1 name=$2
  if is_true "${!name:-false}"; then
    ARGS+=("$flag")
  fi
}

# add_words NAME: append the space-separated words of variable NAME (no quoting supported) to ARGS.
add_words() {
  local -a words=()
  read -r -a words <<<"${!1:-}"
  ARGS+=("${words[@]}")
}

# add_neuron_args: flags the miner and the validator share: wallet, subnet, chain, torch device, state, monitoring.
add_neuron_args() {
  require_vars WALLET_NAME WALLET_HOTKEY
  : "${NETUID:=34}" "${SUBTENSOR_NETWORK:=finney}" "${CHAIN:=bittensor}" "${DEVICE:=auto}" "${METRICS_PORT:=0}"
  require_uint NETUID METRICS_PORT
  [[ "$CHAIN" == bittensor || "$CHAIN" == local ]] || die "CHAIN must be bittensor or local, got '$CHAIN'"
  if [[ -n "${SUBTENSOR_CHAIN_ENDPOINT:-}" && ! "$SUBTENSOR_CHAIN_ENDPOINT" =~ ^wss?://[^[:space:]]+$ ]]; then
    die "SUBTENSOR_CHAIN_ENDPOINT must be a ws:// or wss:// URL, got '$SUBTENSOR_CHAIN_ENDPOINT'"
  fi
  # bittensor's endpoint resolution (Subtensor.setup_config) lets --subtensor.network, which always has a value,
  # win over --subtensor.chain_endpoint: an endpoint is therefore passed AS the network (bittensor accepts a URL
  # there and names the network after it: local, finney, test or unknown).
  ARGS+=(--wallet.name "$WALLET_NAME" --wallet.hotkey "$WALLET_HOTKEY" --netuid "$NETUID" --chain "$CHAIN"
    --subtensor.network "${SUBTENSOR_CHAIN_ENDPOINT:-$SUBTENSOR_NETWORK}"
    --neuron.device "$DEVICE" --neuron.metrics_port "$METRICS_PORT")
  add_flag_if_set --wallet.path WALLET_PATH
  add_flag_if_set --chain.path CHAIN_PATH
  add_flag_if_set --neuron.state_dir STATE_DIR
  add_flag_if_set --neuron.heartbeat_file HEARTBEAT_FILE
  add_flag_if_set --neuron.watchdog_timeout WATCHDOG_TIMEOUT
  add_switch_if_true --logging.debug LOG_DEBUG
  add_switch_if_true --wandb.on WANDB_ON
  add_flag_if_set --wandb.project WANDB_PROJECT
  add_flag_if_set --wandb.entity WANDB_ENTITY
}

# chain_label: the chain the neuron talks to, for the start-up log line (after add_neuron_args).
chain_label() {
  if [[ "$CHAIN" == local ]]; then
    echo "local ${CHAIN_PATH:-(default path)}"
  else
    echo "${SUBTENSOR_CHAIN_ENDPOINT:-$SUBTENSOR_NETWORK}"
  fi
}

# pm2_prefix: the npm prefix scripts/install_pm2.sh installs pm2 into (not a global install).
pm2_prefix() {
  echo "${PM2_PREFIX:-${BITMIND_HOME:-$HOME/.bitmind}/pm2}"
}

# pm2_bin: the pm2 to run: $PM2_BIN when set, else the one scripts/install_pm2.sh installed, else pm2 on PATH.
pm2_bin() {
  local installed
  installed="$(pm2_prefix)/node_modules/.bin/pm2"
  if [[ -n "${PM2_BIN:-}" ]]; then
    echo "$PM2_BIN"
  elif [[ -x "$installed" ]]; then
    echo "$installed"
  else
    echo pm2
  fi
}
