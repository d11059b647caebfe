#!/usr/bin/env bash
# Download the wheels bench/gpu.sh installs on a lent GPU machine, into .whl/ (git-ignored; carry it).
# That machine has torch, transformers, accelerate, safetensors, sentencepiece, typer and
# huggingface_hub (see /work/.library/device/KINDS.md) but not diffusers nor the clean_caption
# dependencies, and its transformers (5.17 when last seen) is older than the 5.24 the tests run:
# transformers 5.24.0 comes along (it accepts that machine's huggingface_hub 1.33 and tokenizers
# 0.23). nvidia-ml-py (NVML, for the GPU memory sampler) in case the machine lacks it. All of these
# are pure-Python wheels; the versions are this venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter: $PYTHON, else this checkout's .venv, else python3 on PATH (pip download only
# reads the index; it installs nothing into it).
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=$(command -v python3 || command -v python)
fi
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 transformers==5.24.0 ftfy==6.3.1 wcwidth==0.9.4 beautifulsoup4==4.15.0 soupsieve==4.1.3 nvidia-ml-py
ls -la .whl
