#!/usr/bin/env bash
# The test suite on a fresh machine: installs what it needs (venv + pinned packages; the Slurm tests install
# Debian's slurm-wlm and munge through apt when run as root), then runs pytest in one process per core
# (pytest-xdist; the Slurm tests share one worker and one cluster).
#   bash scripts/test.sh            the whole suite (CI runs this)
#   bash scripts/test.sh --quick    the quick tier (tests marked quick: every module, a few minutes), before a commit
# Other arguments go to pytest, e.g. `bash scripts/test.sh -k resume` or `bash scripts/test.sh -n 0` (one process).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
args=()
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then args+=(-m quick); else args+=("$arg"); fi
done
exec "$PY" -m pytest -q -p no:cacheprovider -n auto --dist loadgroup "${args[@]}" tests
