#!/usr/bin/env bash
# Every GPU check of this project in one prepared script, for a lent GPU machine (no internet,
# no package index there). Two stages, so that the fused head is checked before the LLM runs
# that use it:
#
#   bash experiments/gpu/gpu_checks.sh fused OUTDIR   # GPU tests + fused-head benchmark (~2 min)
#   bash experiments/gpu/gpu_checks.sh llm OUTDIR     # ~0.1B LLM stress map + TRL step cost (~6 min)
#   bash experiments/gpu/gpu_checks.sh all OUTDIR     # both (~8 min)
#   bash experiments/gpu/gpu_checks.sh bench OUTDIR   # fused checks + TRL step cost, 3 rounds (~5 min)
#
# Python packages missing on the machine travel as wheels in .whl/ and are installed into
# /tmp/site, with erc_gym itself (non-editable, from this checkout; no network needed). Each part
# has its own time limit and writes its log to OUTDIR as it goes, so a part that runs over keeps
# what it printed and the next part still runs. If the GPU tests fail, the LLM runs use the
# PyTorch path (ERC_GYM_USE_TRITON=0) so that their numbers do not rest on a failed kernel.
set -uo pipefail
stage="${1:?usage: gpu_checks.sh fused|llm OUTDIR}"
out="${2:?usage: gpu_checks.sh fused|llm OUTDIR}"
mkdir -p "$out"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$here"
export PYTHONUNBUFFERED=1
wheels=()
if compgen -G ".whl/*.whl" >/dev/null; then wheels=(.whl/*.whl); fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" . || exit 1
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUTDIR/NAME.log
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1
python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1

fused_checks() {
    part gpu_tests 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs
    if ! grep -q " passed" "$out/gpu_tests.log" || grep -q " failed" "$out/gpu_tests.log"; then
        echo "GPU tests failed: the LLM runs below use the PyTorch path"
        export ERC_GYM_USE_TRITON=0
    fi
    part bench_fused_bf16 150 python3 experiments/bench/bench_fused_head.py --device cuda \
        --dtype bfloat16 --repeats 5
}
fp32_bench() {
    part bench_fused_fp32 60 python3 experiments/bench/bench_fused_head.py --device cuda \
        --dtype float32 --tokens 8192 --hidden 2048 --vocab 151936 --repeats 3
}
trl_bench() {  # TRL step time and peak memory: GRPOTrainer vs ERCGRPOTrainer ("trl", "exact")
    part bench_trl "$1" python3 experiments/bench/bench_trl.py --device cuda --preset qwen-0.5b \
        --bf16 --steps 8 --repeats "$2"
}
llm_checks() {
    part llm_map 280 bash experiments/gpu/gpu_llm_map.sh "$out" --budget-s 240
    trl_bench 100 1
}

case "$stage" in
fused) fused_checks; fp32_bench ;;
llm) llm_checks ;;
all) fused_checks; llm_checks; fp32_bench ;;
bench) fused_checks; fp32_bench; trl_bench 170 3 ;;
*)
    echo "unknown stage $stage (fused, llm, all or bench)" >&2
    exit 2
    ;;
esac
