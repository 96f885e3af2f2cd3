#!/usr/bin/env bash
# One run on a lent GPU machine (device tool): the accelerator tests, then decode figures in
# bfloat16 and int8. About 8 minutes on an H100. Prepare here, once:
#   python scripts/random_model.py --like smollm2-135m-instruct --out gpu_shape --no-weights
#   (and wheels of what that image lacks into .whl: gguf, llguidance, starlette, uvicorn)
# then run `bash scripts/gpu_check.sh` there with carry [".whl", "gpu_shape"].
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
git rev-parse --short HEAD 2>/dev/null
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Branch-free sampler, quantized products, attention kernels against the reference.
python3 -m pytest -q -p no:cacheprovider -x \
    tests/test_engine_branchless.py tests/test_engine_quantize.py tests/test_paged_attention.py
python3 scripts/random_model.py --like gpu_shape --out /tmp/random-135m
for q in none int8; do
    python3 scripts/bench_decode.py --model /tmp/random-135m --batches 1 8 64 --new 128 \
        --repeats 2 --no-hf --quantize "$q"
done
