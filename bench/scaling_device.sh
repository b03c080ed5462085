#!/usr/bin/env bash
# The GPU-machine calls behind bench/results/scaling.json, the FSDP runs and the sharded captioning
# runs (BENCHMARKS.md). Results and logs go to $OUT.
#   STAGES:      any of scaling, fsdp, infer, train_fsdp, run in that order (default: the first three)
#   FSDP_GPUS:   the fsdp and train_fsdp stages on the first N GPUs only (default: every GPU)
#   METHODS:     the fsdp stage's recipes (default: lora,qlora,full)
#   METHOD, VARIANTS: the train_fsdp stage's recipe (full or lora) and variants (bench/train_fsdp.py)
#   BUDGET_S:    seconds this script may take in all (default 540)
#   carry: the wheel folders the stages need (bench/device_wheels.sh makes them) and .scaling_data
#          (python bench/fsdp_runs.py prepare .scaling_data) or, for train_fsdp, .train_fsdp_data
#          (python bench/train_fsdp.py prepare .train_fsdp_data); every carried .whl* folder is installed
set -uo pipefail
: "${OUT:?set OUT to the folder for results and logs}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
budget=${BUDGET_S:-540}
stages=${STAGES:-scaling fsdp infer}
wheels=$(ls .whl*/*.whl)
if [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$wheels" ]; then  # a warm machine keeps what an earlier call installed
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels || exit 1
    echo "$wheels" > /tmp/site/.wheels
fi
export PYTHONPATH=/tmp/site:$PWD
{
    nvidia-smi --query-gpu=index,name,memory.total --format=csv
    df -h /dev/shm /tmp | tail -n +1
    python3 -c 'import importlib, torch
names = ["transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "av", "liger_kernel", "triton"]
found = {n: getattr(importlib.import_module(n), "__version__", "?") for n in names if importlib.util.find_spec(n)}
print("torch", torch.__version__, *(f"{n} {v}" for n, v in found.items()))'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
left() { echo $((budget - SECONDS)); }
for stage in $stages; do
    case $stage in
    scaling)
        python3 bench/scaling.py --out "$OUT/scaling.json" --clips_per_gpu "${CLIPS_PER_GPU:-128}" --run_timeout 240 \
            > "$OUT/scaling.log" 2>&1
        tail -n 8 "$OUT/scaling.log" ;;
    fsdp)
        gpus=${FSDP_GPUS:-$(nvidia-smi -L | wc -l)}
        CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1))) python3 bench/fsdp_runs.py run .scaling_data \
            --out "$OUT/fsdp_runs_${gpus}gpu.json" --logs "$OUT" --methods "${METHODS:-lora,qlora,full}" \
            --budget_s "$(left)" 2>&1 | grep -v '%|' | tail -n 40 ;;
    train_fsdp)
        # results merge into the file the working tree carries, so calls of a few variants each add up
        [ -f bench/results/train_fsdp.json ] && cp bench/results/train_fsdp.json "$OUT/train_fsdp.json"
        python3 bench/train_fsdp.py run .train_fsdp_data --method "${METHOD:-full}" \
            --gpus "${FSDP_GPUS:-$([ "${METHOD:-full}" = lora ] && echo 1 || nvidia-smi -L | wc -l)}" \
            ${VARIANTS:+--variants "$VARIANTS"} --out "$OUT/train_fsdp.json" --logs "$OUT" --budget_s "$(left)" \
            2>&1 | tail -n 20 ;;
    infer)
        python3 bench/sharded_infer.py .scaling_data --out "$OUT/sharded_infer.json" --logs "$OUT" \
            ${INFER_BATCHED:+--batched} --run_timeout "$(left)" 2>&1 | grep -v '%|' | tail -n 20 ;;
    esac
done
