#!/usr/bin/env bash
# Checks that pyproject.toml's floors are true: a fresh venv gets every `>=` floor of the package and of the
# extras the tests use, exactly (`name==floor`), pip resolves the rest, and the quick test loop runs there.
# Not part of CI (a 6 GB venv, minutes of installing). Usage: scripts/check_floors.sh [pytest arguments]
# torch, torchvision and torchcodec go together (each torchvision/torchcodec release is built for one torch):
# TORCH names the set, by default this machine's torch as install.sh pins it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FLOORS_VENV:-.cache/venv-floors}
torch=${TORCH:-torch==2.14.1 torchvision==0.29.1 torchcodec==0.17.0}
python3.11 -m venv --clear "$venv"
"$venv/bin/python" - "$torch" > "$venv/floors.txt" <<'PY'
import re, sys, tomllib
pyproject = tomllib.load(open("pyproject.toml", "rb"))
project, extras = pyproject["project"], pyproject["project"]["optional-dependencies"]
torch_set = {pin.split("==")[0] for pin in sys.argv[1].split()}
for requirement in project["dependencies"] + extras["catalog"] + extras["judge"] + extras["dev"]:
    requirement, _, marker = requirement.partition(";")
    name, floor = re.fullmatch(r"\s*([\w.-]+)\s*>=\s*([\w.]+).*", requirement).groups()
    # label-studio-sdk 2 needs a newer Pillow than the package's floor; its two tests skip without it
    if name not in torch_set and name != "label-studio-sdk":
        print(f"{name}=={floor}" + (f"; {marker}" if marker else ""))
# as it is: tests/test_package.py builds the wheel with this venv's setuptools (no build isolation)
print(*pyproject["build-system"]["requires"], sep="\n")
PY
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
"${pip[@]}" $torch  # first, so that the floors resolve against it
"${pip[@]}" $torch -r "$venv/floors.txt"
"${pip[@]}" --no-deps -e .
"$venv/bin/pip" check
"$venv/bin/pip" freeze > "$venv/freeze.txt"
# train/sft_options.json is written for one trl and transformers: write it for these while the tests run
cp train/sft_options.json "$venv/"
trap 'cp "$venv/sft_options.json" train/' EXIT
export PYTHONPATH=$PWD
"$venv/bin/python" -c "from avlabel.train.sft import SFT_CONFIG; SFT_CONFIG.write_snapshot()"
"$venv/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider "$@"
