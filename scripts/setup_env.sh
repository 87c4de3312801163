#!/usr/bin/env bash
# Create ./.venv (if missing) and install the pinned requirements into it: requirements.txt and
# requirements-export.txt (ONNX export, so its tests run). Sourced by demo.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.requirements.sha"
requirements=("$root/requirements.txt" "$root/requirements-export.txt")
# the stamp covers every requirements file: a change to any of them reinstalls
want="$(cat "${requirements[@]}" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${requirements[@]/#/--requirement=}"
  echo "$want" > "$stamp"
fi
PY="$venv/bin/python"
export PY
