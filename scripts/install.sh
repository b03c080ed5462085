#!/usr/bin/env bash
# Installs what this project's machines need, once: system packages (FFmpeg for torchcodec,
# Chromium for the catalog's screenshot test), this machine's exact torch, the package in editable
# mode with every extra (catalog, judge, dev: what CI tests), and a Label Studio server for the
# review round-trip test. The package itself only asks for ranges (pyproject.toml), so
# `pip install avlabel` elsewhere keeps the user's torch. Re-running is cheap: it skips everything
# when pyproject.toml hasn't changed since the last install.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."

stamp=.cache/install.stamp
# Label Studio's server gets its own venv: it pins numpy, Django and opencv apart from this project's
# packages. tests/test_labelstudio.py starts it from here (LABEL_STUDIO_BIN says where, if elsewhere).
label_studio_venv=${LABEL_STUDIO_VENV:-.cache/label-studio}
want=$( (cat pyproject.toml scripts/install.sh; python3 --version) | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python3 -c "import avlabel, torch, trl" 2>/dev/null \
        && [ -x "$label_studio_venv/bin/label-studio" ]; then
    exit 0
fi

need_apt=()
command -v ffmpeg >/dev/null || need_apt+=(ffmpeg)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# torch first and pinned to this machine's build: pip takes these two wheels from the local disk
python3 -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python3 -m pip install -q --disable-pip-version-check -e ".[catalog,judge,dev]"

if [ ! -x "$label_studio_venv/bin/label-studio" ]; then
    python3 -m venv "$label_studio_venv"
    "$label_studio_venv/bin/pip" install -q --disable-pip-version-check "label-studio>=1.20,<2"
fi

mkdir -p .cache && echo "$want" > "$stamp"
