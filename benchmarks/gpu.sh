#!/usr/bin/env bash
# Every GPU check of issue 13 in one run, at most 8 minutes on one H100/H200-class GPU:
#   1. the CUDA tests: CUDA graphs replay eager's numbers (fp32, fp16), the kernels equal their references
#   2. the full SDXL-Turbo ReNoise inversion (official settings, random SDXL-Turbo-sized weights, 512 px,
#      fp16): the official loop on diffusers against renoise eager / compile / cuda-graphs, s per image
#   3. renoise.kernels: the fused GroupNorm+SiLU against eager and inductor on SD 1.5's shapes (wins / loses)
#      and loading: SD 1.5-sized fp32 checkpoint straight to fp16 on CUDA, renoise against diffusers (warm)
#   4. the UNet pass in ms, SD 1.5 @512 and SDXL-Turbo @512 sized random weights: eager ours against
#      diffusers' for B = 1 and 2, fp16 and bf16; then compiled and CUDA-graphed (an explicit capture of
#      the compiled module), fp16 B = 1, as far as the time allows; TFLOP/s against 0.80 (SD 1.5) and
#      1.59 (SDXL) TFLOP per pass
#   5. the flow transformers (issue 22), one forward in bf16 at 1024 px with random full-size weights:
#      SD 3.5 medium and FLUX.1-dev (guidance embedding), ours against diffusers' on the same tensors,
#      eager, compiled and CUDA-graphed (as far as the time allows)
# Each step has its own time limit, cut to what is left of the 8 minutes; JSON and a log go to $OUT
# (default benchmarks/out). Without CUDA it stops at once with exit code 2.
#
#   bash benchmarks/gpu.sh            # on the GPU machine, from anywhere
#   bash benchmarks/gpu.sh --check    # anywhere: syntax and every script's arguments, no GPU needed
#   bash benchmarks/gpu.sh --transformers   # only step 5 (SD3 / Flux rows)
#
# Python: the first of $PYTHON, python3, python that imports torch. Missing packages (diffusers is
# not on every image) can come as wheels in .whl/ at the repository root: they are installed with
# renoise itself into a temporary site folder (no network needed). To prepare them on a machine with
# network:  pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TOTAL=${GPU_SH_SECONDS:-470}
START=$SECONDS

PY=""
for p in ${PYTHON:-} python3 python; do
    if command -v "$p" >/dev/null && "$p" -c "import torch" 2>/dev/null; then PY=$p; break; fi
done
[ -n "$PY" ] || { echo "gpu.sh: no python with torch found (set PYTHON=...)" >&2; exit 2; }

if [ "${1:-}" = "--check" ]; then
    bash -n "$0" || exit 1
    for s in benchmarks/inversion.py benchmarks/unet.py benchmarks/loading.py benchmarks/fused_kernels.py \
             benchmarks/transformer.py benchmarks/transformer_memory.py; do
        "$PY" "$s" --help >/dev/null || { echo "gpu.sh --check: $s --help failed" >&2; exit 1; }
    done
    "$PY" -m pytest --collect-only -q tests/test_speed.py -k cuda >/dev/null || { echo "gpu.sh --check: collect failed" >&2; exit 1; }
    echo "gpu.sh --check: ok (syntax, arguments of every script, the CUDA tests collect)"
    exit 0
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False); these checks need one" >&2
    exit 2
}

# renoise (and carried wheels) into a temporary site folder, unless renoise already imports
SITE=$(mktemp -d)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 2
fi
if ! PYTHONPATH="$SITE" "$PY" -c "import renoise.models" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . || exit 2
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import diffusers" 2>/dev/null || { echo "gpu.sh: diffusers is missing; put its wheel in .whl/ (see the header)" >&2; exit 2; }

{
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
"$PY" -c "import torch, diffusers, platform; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '|', torch.cuda.get_device_name(), '| python', platform.python_version())"
date -u +"%Y-%m-%d %H:%M UTC"
} 2>&1 | tee "$OUT/gpu_env.txt"

step() {   # step NAME LIMIT_SECONDS COMMAND...: runs with the limit cut to the time left
    local name=$1 limit=$2; shift 2
    local left=$((TOTAL - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then echo "== $name: skipped, ${left}s left of ${TOTAL}s"; return; fi
    echo "== $name (limit ${limit}s)"
    timeout -k 5 "$limit" "$@"
    echo "== $name: exit $?, $((SECONDS - START))s since start"
}

ONLY=""
[ "${1:-}" = "--transformers" ] && ONLY=transformers

transformers() {
step "SD3 / Flux transformer pass, bf16 eager" 90 "$PY" benchmarks/transformer.py \
    --cases sd35m-cuda-1024 flux-dev-cuda-1024 --dtypes bfloat16 --reps 10 --json "$OUT/transformer_gpu_eager.json"
step "SD3 / Flux transformer pass, compiled and graphed" 240 "$PY" benchmarks/transformer.py \
    --cases sd35m-cuda-1024 flux-dev-cuda-1024 --dtypes bfloat16 --compile --graphs --reps 10 --budget 150 \
    --json "$OUT/transformer_gpu_compiled.json"
}

if [ "$ONLY" = transformers ]; then
    { transformers; echo "gpu.sh: done in $((SECONDS - START))s"; } 2>&1 | tee "$OUT/gpu_transformers.log"
    exit 0
fi

{
step "CUDA tests" 100 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_speed.py tests/test_kernels.py -k "cuda or test_kernels"
step "SDXL-Turbo inversion" 230 "$PY" benchmarks/inversion.py --part speed --size sdxl-turbo --device cuda \
    --dtype float16 --compile compile cuda-graphs --repeats 3 --budget 150 --out "$OUT"
step "kernels" 40 "$PY" benchmarks/fused_kernels.py --json "$OUT/kernels.json"
step "loading" 40 "$PY" benchmarks/loading.py --targets float16:cuda --modes warm --json "$OUT/loading_gpu.json"
step "UNet pass, eager" 60 "$PY" benchmarks/unet.py --cases sd15-cuda-512 sdxlturbo-cuda-512 --batch 1 2 \
    --dtypes float16 bfloat16 --no-load --reps 20 --json "$OUT/unet_gpu_eager.json"
step "UNet pass, compiled and graphed" 150 "$PY" benchmarks/unet.py --cases sd15-cuda-512 sdxlturbo-cuda-512 \
    --batch 1 --dtypes float16 --compile --graphs --no-load --reps 20 --budget 90 --json "$OUT/unet_gpu_compiled.json"
transformers
echo "gpu.sh: done in $((SECONDS - START))s"
} 2>&1 | tee "$OUT/gpu.log"
