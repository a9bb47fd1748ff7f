#!/usr/bin/env bash
# Every speed figure of this project on one GPU machine, in one call and one table, in under
# 8 minutes (scripts/gpu_check.py says what it runs):
#
#   bash scripts/gpu_check.sh --fetch-wheels   # on a machine with pip: wheels of the packages a
#                                              # bare GPU image lacks, into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh                  # on the GPU machine (carry .whl/ along)
#   bash scripts/gpu_check.sh --tiny           # anywhere, on the CPU, in seconds (a test runs it)
#
# Further flags go to gpu_check.py (--budget SECONDS, --work DIR, --class_batch N ...).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# What the GPU machines' image lacks of pyproject's dependencies (it has torch, transformers,
# safetensors, einops, tensorboard, numpy, pillow, tqdm, timm, regex, huggingface-hub), plus
# diffusers for the side-by-side rows; the versions are the ones installed here.
WHEELS="omegaconf open_clip_torch ftfy wcwidth diffusers"

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    for name in $WHEELS; do
        version="$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))")" || exit 1
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$name==$version" || exit 1
    done
    ls .whl
    exit 0
fi

if [ "${1:-}" != "--tiny" ] && compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
