#!/usr/bin/env bash
# Type-check the product code (mypy, settings in pyproject.toml) through the editable link
# tree that scripts/setup.sh installs, where `disagg.transfer` & co. are real folders.
# Errors are reported at the checkout's paths (transfer/..., not the link tree's).
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(ls -d build/__editable__.disagg-*/ 2>/dev/null | head -1)
if [[ -z $tree || ! -d $tree/disagg ]]; then
  echo "typecheck: no link tree under build/; run scripts/setup.sh first" >&2
  exit 2
fi
tree=${tree%/}
MYPYPATH=$tree .venv/bin/mypy --cache-dir .cache/mypy -p disagg "$@" 2>&1 \
  | sed -E "s#^$tree/disagg/(transfer|kernels|scheduler|launch)/#\\1/#; s#^$tree/disagg/#disagg/#"
