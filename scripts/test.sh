#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (venv + pinned packages; the Slurm tests
# install Debian's slurm-wlm and munge through apt when run as root), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$PY" -m pytest -q -p no:cacheprovider "$@" tests
