#!/usr/bin/env bash
# The GPU checks, as one script to run on a CUDA machine from the repository root:
#   bash benchmarks/on_gpu.sh tests                # tests/test_cuda.py and tests/test_sample.py
#   bash benchmarks/on_gpu.sh speed fp16 300 [R]   # train_speed.py on the SD1.5-shaped model, S = 300, R pairs
#   bash benchmarks/on_gpu.sh speed-xl bf16 50 [R]  # cdtool alone on the SDXL-shaped model at 1024 px
# The machine's own python3 holds torch, transformers, peft and accelerate; the rest travels as
# wheels in .whl/ and the reference trainer as .ref/train_custom_diffusion.py (both git-ignored):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 typer==0.29.2 pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
#     open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
#   cp DIFFUSERS/examples/custom_diffusion/train_custom_diffusion.py .ref/
# Logs go to $OUT (or ./gpu-out) so that a run stopped at its time limit still leaves them.
set -o pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers, accelerate, typer; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'typer', typer.__version__)"
case "$1" in
tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_sample.py 2>&1 | tee "$out/tests.log"
    ;;
speed)
    python3 benchmarks/train_speed.py --reference .ref/train_custom_diffusion.py --model sd15 \
        --mixed-precision "${2:-bf16}" --steps "${3:-300}" --repeats "${4:-1}" --workdir /tmp/bench 2>&1 | tee "$out/speed-${2:-bf16}.log"
    ;;
speed-xl)
    python3 benchmarks/train_speed.py --model sdxl --mixed-precision "${2:-bf16}" --steps "${3:-50}" \
        --repeats "${4:-1}" --workdir /tmp/bench 2>&1 | tee "$out/speed-xl-${2:-bf16}.log"
    ;;
*)
    echo "usage: bash benchmarks/on_gpu.sh tests | speed PRECISION STEPS [REPEATS] | speed-xl PRECISION STEPS [REPEATS]" >&2
    exit 2
    ;;
esac
