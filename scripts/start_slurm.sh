#!/bin/bash
# Start the tests' one-node Slurm cluster (tests/slurm_cluster.py) by hand, for debugging launchers:
#   scripts/start_slurm.sh [DIR]        (default DIR: /tmp/smca-slurm; runs until Ctrl-C)
# then, in another shell:  export SLURM_CONF=DIR/etc/slurm.conf; sinfo; sbatch ...
# Needs root (slurmd runs as root); installs slurm-wlm and munge with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" tests/slurm_cluster.py start "${1:-/tmp/smca-slurm}"
