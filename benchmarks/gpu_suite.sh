#!/usr/bin/env bash
# The GPU benchmark suite as run on the lent H100/H200 hosts (no network; Ray and diffusers come
# from the bundle `../shared/gpu/make-bundle.sh` builds into .gpu/). Each step writes its JSON to
# $OUT as soon as it finishes, so a run cut short still returns what it measured.
#
#   bash benchmarks/gpu_suite.sh pipeline   # in-process: baseline sweep, speed-up variants, compile cold/warm
#   bash benchmarks/gpu_suite.sh startup    # cold vs warm start of the compiled UNet (needs no Ray)
#   bash benchmarks/gpu_suite.sh graphs     # CUDA graphs vs plain compile (batch 1), VAE slicing (needs no Ray)
#   bash benchmarks/gpu_suite.sh http       # end to end over HTTP: unoptimized vs optimized app, same run
set -uo pipefail
step=${1:?pipeline, startup, graphs or http}
OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT" /tmp/site
tar xJf .gpu/bundle.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_worker_niceness=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# Compile caches live in an ignored folder of the checkout, which the device machine keeps between
# calls while it stays warm.
CACHE=$PWD/bench-out/compile-cache
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
  python3 -c "import ray; print('ray', ray.__version__)" 2>&1 | tail -1
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
} | tee "$OUT/gpu.txt"

case "$step" in
pipeline)
  python3 benchmarks/bench_pipeline.py --variants baseline --batches 1,2,4,8,16 --tag baseline --out "$OUT"
  python3 benchmarks/bench_pipeline.py --variants cl_qkv,bf16,fp8 --batches 1,8 --reference "$OUT/baseline_seed0.npy" --tag variants --out "$OUT"
  # Cold then warm start of the compiled variant: the same command, an empty cache, then a full one.
  rm -rf "$CACHE"
  for start in cold warm; do
    python3 benchmarks/bench_pipeline.py --variants compile --batches 1,8 --compile-cache "$CACHE" \
      --reference "$OUT/baseline_seed0.npy" --tag "compile_$start" --out "$OUT"
  done
  ;;
startup)
  # Start-up cost of the compiled variant alone: an empty cache, then the same process again.
  rm -rf "$CACHE"
  for start in cold warm; do
    python3 benchmarks/bench_pipeline.py --variants compile --batches 1,8 --compile-cache "$CACHE" --no-stages \
      --tag "compile_$start" --out "$OUT"
  done
  ;;
graphs)
  # CUDA graphs (compile mode reduce-overhead) against plain compile at batch 1, the single-request
  # path where launch overhead matters most; VAE slicing against the baseline at batch 8. Needs no Ray.
  python3 benchmarks/bench_pipeline.py --variants baseline,vae_slicing --batches 1,8 --no-stages --tag slicing --out "$OUT"
  python3 benchmarks/bench_pipeline.py --variants compile,compile_cudagraphs --batches 1 --no-stages \
    --compile-cache "$CACHE" --reference "$OUT/baseline_seed0.npy" --tag graphs --out "$OUT"
  ;;
http)
  base='{"source": "sdxl-arch", "device": "cuda", "dtype": "float16", "attention": "sdpa"}'
  fast=${FAST_SPEC:-'{"source": "sdxl-arch", "device": "cuda", "dtype": "float16", "attention": "sdpa", "optimize": {"channels_last": true, "fuse_qkv": true}}'}
  python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus 4 --ray-cpus 8 --size 1024 --steps 30 \
    --requests ${REQUESTS:-24} --concurrency ${CONCURRENCY:-1,16} --max-batch-size 8 --batch-wait-s 0.1 \
    --model "unoptimized=$base" --model "optimized=$fast" --out "$OUT"
  ;;
esac
