#!/usr/bin/env bash
# Creates .venv and installs tl_fast with every backend (DALI, FFCV), matplotlib and the test tools.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# FFCV builds from source against libturbojpeg and OpenCV.
need_apt=0
for pkg in pkg-config libturbojpeg0-dev libopencv-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pkg-config libturbojpeg0-dev libopencv-dev >/dev/null
    else
        echo "FFCV needs: sudo apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev" >&2
        exit 1
    fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,dali,ffcv,plot]"
.venv/bin/python -c "import tl_fast, torch; print('tl_fast', tl_fast.__version__, 'torch', torch.__version__)"
