#!/usr/bin/env bash
# The test command: lint, type-check, then the whole suite (unit tests, the layer check,
# then integration tests that start real vLLM engines, Ray actors and NIXL transfers on this
# machine's CPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DISAGG_CACHE_DIR=${DISAGG_CACHE_DIR:-$PWD/.cache/disagg}
.venv/bin/ruff check .
bash scripts/typecheck.sh
exec .venv/bin/pytest -q -ra --timeout=1200 "$@"
