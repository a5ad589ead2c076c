#!/usr/bin/env bash
# Prepare a fresh Ubuntu 22.04 / 24.04 box (GPU optional for a miner) to run this node under pm2:
# system packages, Node.js, pm2 (the pinned release, in a local npm prefix, via install_pm2.sh) + log rotation,
# a Python venv at <repo>/.venv with this project installed, optionally btcli in its own venv and a role's env file.
# Idempotent: every step checks first and does nothing when it is already done, so re-running it is safe
# (the project is reinstalled only when setup.py / pyproject.toml / the version / EXTRAS changed).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
Usage: scripts/setup_gpu_box.sh [--role miner|validator] [--with-btcli] [--skip-apt] [--skip-node]

  --role R       also create <repo>/R.env from scripts/R.env.example when it does not exist yet
  --with-btcli   install btcli (PyPI bittensor-cli) into its own venv, BTCLI_VENV (default ~/.bittensor-cli-venv)
  --skip-apt     do not install system packages (no root needed; they must already be there)
  --skip-node    do not install Node.js / pm2

Environment: PYTHON (default python3, must be 3.10-3.12), VENV_DIR (default <repo>/.venv),
             EXTRAS (pip extras, e.g. "wandb"), NODE_MAJOR_MIN (default 18),
             PM2_PREFIX (where install_pm2.sh puts pm2, default ~/.bitmind/pm2).
USAGE
}

ROLE=""
WITH_BTCLI=false
SKIP_APT=false
SKIP_NODE=false
while (($#)); do
  case $1 in
    --role)
      ROLE=${2:-}
      shift 2 || die "--role needs a value"
      ;;
    --with-btcli) WITH_BTCLI=true; shift ;;
    --skip-apt) SKIP_APT=true; shift ;;
    --skip-node) SKIP_NODE=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ -z "$ROLE" || "$ROLE" == miner || "$ROLE" == validator ]] || die "--role must be miner or validator, got '$ROLE'"

PYTHON=${PYTHON:-python3}
VENV_DIR=${VENV_DIR:-$REPO_ROOT/.venv}
BTCLI_VENV=${BTCLI_VENV:-$HOME/.bittensor-cli-venv}
EXTRAS=${EXTRAS:-}
NODE_MAJOR_MIN=${NODE_MAJOR_MIN:-18}

as_root() {
  if ((EUID == 0)); then "$@"; else sudo "$@"; fi
}

is_installed_deb() {
  # shellcheck disable=SC2016  # ${Status} is dpkg-query's format field, not a shell variable
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

step_apt() {
  local venv_pkg=python3-venv
  [[ "$PYTHON" == python3 ]] || venv_pkg="$(basename "$PYTHON")-venv"
  local wanted=(git curl ca-certificates build-essential python3-dev "$venv_pkg")
  # Node from Ubuntu only when there is none yet (a NodeSource / n install bundles npm; apt's npm would conflict).
  if [[ $SKIP_NODE == false ]] && ! command -v node >/dev/null; then wanted+=(nodejs npm); fi
  local missing=() pkg
  for pkg in "${wanted[@]}"; do
    is_installed_deb "$pkg" || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    log "ok: system packages present"
    return
  fi
  log "installing system packages: ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

node_major() {
  if command -v node >/dev/null; then node -p 'process.versions.node.split(".")[0]'; else echo 0; fi
}

step_node() {
  command -v npm >/dev/null || die "npm not found: install Node.js ${NODE_MAJOR_MIN}+ (or drop --skip-apt)"
  if (($(node_major) < NODE_MAJOR_MIN)); then
    # Ubuntu 22.04 ships Node 12, too old for pm2: install the current LTS with the `n` version manager.
    log "Node $(node_major) is older than ${NODE_MAJOR_MIN}: installing the LTS release with n"
    as_root npm install -g n
    as_root n lts
    hash -r
  fi
  log "ok: node $(node -v)"
  NODE_MAJOR_MIN=$NODE_MAJOR_MIN "$REPO_ROOT/scripts/install_pm2.sh"
  local pm2 logrotate_version=3.0.0
  pm2="$("$REPO_ROOT/scripts/install_pm2.sh" --print-path)"
  if [[ ! -d "${PM2_HOME:-$HOME/.pm2}/modules/pm2-logrotate" ]]; then
    log "installing pm2-logrotate $logrotate_version (keeps the pm2 logs bounded)"
    "$pm2" install "pm2-logrotate@$logrotate_version"
  fi
  log "ok: pm2-logrotate; put pm2 on your PATH: export PATH=\"$(dirname "$pm2"):\$PATH\" (e.g. in ~/.bashrc)"
}

step_python() {
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=python3.11, e.g. from the deadsnakes PPA)"
  "$PYTHON" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' ||
    die "$PYTHON is $("$PYTHON" -V 2>&1); this project needs Python 3.10-3.12 (set PYTHON=python3.11)"
  if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    log "creating the virtual environment $VENV_DIR"
    "$PYTHON" -m venv "$VENV_DIR"
    "$VENV_DIR/bin/python" -m pip install -q --upgrade pip
  fi
  log "ok: venv $VENV_DIR ($("$VENV_DIR/bin/python" -V))"

  local stamp_file="$VENV_DIR/.bitmind-install-stamp" want have target="$REPO_ROOT"
  want=$(cat "$REPO_ROOT/setup.py" "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/bitmind/__init__.py" <(echo "$EXTRAS") |
    sha256sum | cut -d' ' -f1)
  have=$(cat "$stamp_file" 2>/dev/null || true)
  if [[ "$want" == "$have" ]]; then
    log "ok: project already installed (delete $stamp_file to force a reinstall)"
    return
  fi
  [[ -z "$EXTRAS" ]] || target="${REPO_ROOT}[$EXTRAS]"
  log "installing the project into $VENV_DIR (torch and CUDA wheels: several GB, takes minutes)"
  "$VENV_DIR/bin/python" -m pip install -e "$target"
  echo "$want" >"$stamp_file"
}

step_btcli() {
  if [[ ! -x "$BTCLI_VENV/bin/btcli" ]]; then
    log "installing btcli (bittensor-cli) into $BTCLI_VENV"
    "$PYTHON" -m venv "$BTCLI_VENV"
    "$BTCLI_VENV/bin/python" -m pip install -q bittensor-cli
  fi
  log "ok: btcli at $BTCLI_VENV/bin/btcli (add it to PATH or call it by this path)"
}

step_env_file() {
  local env_file="$REPO_ROOT/$ROLE.env"
  if [[ -f "$env_file" ]]; then
    log "ok: $env_file exists (left untouched)"
    return
  fi
  install -m 600 "$REPO_ROOT/scripts/$ROLE.env.example" "$env_file"
  log "created $env_file: set WALLET_NAME and WALLET_HOTKEY in it"
}

step_gpu_report() {
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    log "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | paste -sd ';')"
  else
    log "warning: no working NVIDIA driver found: a miner runs on CPU; a validator's generator needs a GPU" \
      "(install the driver yourself, e.g. 'sudo ubuntu-drivers install', then reboot)"
  fi
}

if [[ $SKIP_APT == false ]]; then step_apt; fi
if [[ $SKIP_NODE == false ]]; then step_node; fi
step_python
if [[ $WITH_BTCLI == true ]]; then step_btcli; fi
if [[ -n "$ROLE" ]]; then step_env_file; fi
step_gpu_report
log "done. Next: edit ${ROLE:-<role>}.env, then pm2 start scripts/ecosystem.config.js --only ..."
