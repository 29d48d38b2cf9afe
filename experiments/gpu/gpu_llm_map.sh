#!/usr/bin/env bash
# The ~0.1B LLM stress map on one GPU (see experiments/gpu/gpu_llm_map.py for what it does).
#   bash experiments/gpu/gpu_llm_map.sh OUTDIR [--budget-s 240] [--workers N]
#   ERC_GYM_GPU_MAP_SHRINK=1 bash experiments/gpu/gpu_llm_map.sh OUTDIR    # CPU smoke test
# erc_gym is used from this checkout without installing it: the installed package maps the
# top-level envs/ folder to erc_gym.envs, so a throw-away folder of links rebuilds that layout
# on PYTHONPATH (child processes inherit it). PYTHON picks the interpreter (default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
mkdir "$shim/erc_gym"
for entry in "$here"/erc_gym/*; do
    ln -s "$entry" "$shim/erc_gym/$(basename "$entry")"
done
ln -s "$here/envs" "$shim/erc_gym/envs"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python3}" "$here/experiments/gpu/gpu_llm_map.py" "$@"
