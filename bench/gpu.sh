#!/usr/bin/env bash
# The GPU benchmark in one command (bench/gpu_bench.py does the work; see bench/README.md).
#   bash bench/gpu.sh            on a machine with a CUDA GPU: build the full-size random model, run
#                                4 prompts at 1024x1024 with no budget, --exact, budgets 8/2/1 GiB,
#                                and the diffusers baselines (resident, model and sequential offload);
#                                tables to $OUT (else bench/results/), rewritten after every run
#   bash bench/gpu.sh --quick    2 prompts, 10 steps, the 5 most important rows: ~5 minutes
#   bash bench/gpu.sh --smoke    the same code on the CPU with a tiny model, in about 1.5 minutes
#   bash bench/gpu.sh --lora     issue 19: none, one and three LoRAs per image, resident and group-offloaded,
#                                on the full-size random model ($MODEL, built by bench/fullsize.py if
#                                missing): bench/lora.py --device cuda, table to $OUT/lora.md
# Extra arguments go to bench/gpu_bench.py (--out DIR, --work DIR, --time-limit S,
# --run-timeout SLUG=S, --jobs N).
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter: $PYTHON, else this checkout's venv, else the machine's python3.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

# A machine without diffusers (the lent GPU machines) installs the carried wheels from .whl/
# (bench/fetch_wheels.sh downloads them) into /tmp/site, once per machine.
if ! "$PY" -c "import diffusers, ftfy, bs4" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "installing carried wheels from .whl/ into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "error: $PY cannot import diffusers, ftfy and bs4, and .whl/ holds no wheels; run bench/fetch_wheels.sh first" >&2
        exit 2
    fi
fi

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--lora" ]; then
    shift
    MODEL=${MODEL:-/tmp/pixart-random}
    [ -f "$MODEL/model_index.json" ] || "$PY" bench/fullsize.py --out "$MODEL"
    exec "$PY" bench/lora.py --device cuda --model "$MODEL" --size 1024 --steps 20 --images 3 "$@"
fi
exec "$PY" bench/gpu_bench.py "$@"
