#!/usr/bin/env bash
# benchmarks/gpu_check on a lent GPU machine (the `device` tool's `run`). Its image has torch and transformers but
# neither diffusers nor open_clip (whose wheel only supplies CLIP's BPE vocabulary), so both travel as wheels.
# Once, here, in the repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 open_clip_torch==3.3.0
# Then, as the device command with carry [".whl"] (arguments go to gpu_check; split the families over two calls if
# one would pass 600 s):
#   bash scripts/gpu_check_on_device.sh --families sd15,sdxl
# The output, with the markdown table the README takes, is also written to $OUT/gpu_check.log.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'diffusers', diffusers.__version__)"
python3 -m benchmarks.gpu_check "$@" 2>&1 | tee "${OUT:-.}/gpu_check.log"
