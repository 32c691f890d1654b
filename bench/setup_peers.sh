#!/usr/bin/env bash
# Create the environment of bench/subtract.py: rbflow (editable, with its sfft extra) plus the
# peers of bench/peers-requirements.txt (sfft, properimage). Usage, from the repository root:
#   bash bench/setup_peers.sh            # creates $RBFLOW_PEERS_VENV (default /tmp/rbflow-peers-venv)
#   "$RBFLOW_PEERS_VENV"/bin/python bench/subtract.py
# The venv lies outside the repository so that git never sees it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${RBFLOW_PEERS_VENV:-/tmp/rbflow-peers-venv}"
python="${PYTHON:-python3.11}"
"$python" -m venv "$venv"
pip=("$venv/bin/pip" install --no-cache-dir -c constraints.txt)
# tinynpydb (a properimage dependency, sdist only) cannot build in an isolated environment with
# setuptools >= 82 (no pkg_resources); build it first against setuptools < 82.
"${pip[@]}" "setuptools<82" wheel
"${pip[@]}" --no-build-isolation tinynpydb
"${pip[@]}" -e ".[sfft]" -r bench/peers-requirements.txt
"$venv/bin/python" -c "import rbflow, sfft, properimage; print('peers ready:', sfft.__version__, properimage.__version__)"
