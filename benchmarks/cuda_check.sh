#!/usr/bin/env bash
# The engine's CUDA path on a GPU machine in one go: correctness against the CPU engine and mergekit
# (benchmarks/cuda_check.py), then candidate merge speed on SmolLM2-135M's shapes and on Llama-7B's shapes
# with 2 layers (benchmarks/merge_speed.py). Each step has its own time limit so one slow step cannot
# take the others' output with it. Logs and JSON go to $OUT (default ./cuda-check-out).
#
# The machine needs torch with CUDA and transformers; mergekit and the pydantic it needs can come as
# wheels in .whl/ (python 3.12, manylinux), installed to /tmp/site:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl mergekit==0.1.5 immutables==0.21 pydantic==2.13.4 \
#     pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
# Usage: bash benchmarks/cuda_check.sh [check seconds] [smollm2 speed seconds] [llama7b speed seconds]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-cuda-check-out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers, mergekit, importlib.metadata as m; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'mergekit', m.version('mergekit'), 'cpus', torch.get_num_threads())"

started=$(date +%s)
timeout "${1:-130}" python3 benchmarks/cuda_check.py --device cuda --out "$OUT/cuda_check.json" 2>&1 \
    | grep --line-buffered -v "Writing model shards" | tee "$OUT/cuda_check.log"
rc=${PIPESTATUS[0]}
echo "# cuda_check exit $rc after $(($(date +%s) - started)) s"

started=$(date +%s)
timeout "${2:-110}" python3 benchmarks/merge_speed.py --device cuda --random --repeats 10 2>&1 \
    | grep --line-buffered -v "Writing model shards" | tee "$OUT/speed_smollm2.log"
rc=${PIPESTATUS[0]}
echo "# merge_speed smollm2 exit $rc after $(($(date +%s) - started)) s"

started=$(date +%s)
timeout "${3:-70}" python3 benchmarks/merge_speed.py --device cuda --shape llama7b --layers 2 \
    --methods linear,ties,dare_ties,della --repeats 10 2>&1 \
    | grep --line-buffered -v "Writing model shards" | tee "$OUT/speed_llama7b.log"
rc=${PIPESTATUS[0]}
echo "# merge_speed llama7b-2-layers exit $rc after $(($(date +%s) - started)) s"
