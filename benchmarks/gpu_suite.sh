#!/usr/bin/env bash
# The GPU benchmark suite as run on the lent H100/H200 hosts (no network; Ray and diffusers come
# from the bundle `../shared/gpu/make-bundle.sh` builds into .gpu/). Each step writes its JSON to
# $OUT as soon as it finishes, so a run cut short still returns what it measured.
#
#   bash benchmarks/gpu_suite.sh pipeline   # in-process: baseline sweep, speed-up variants, compile cold/warm
#   bash benchmarks/gpu_suite.sh startup    # cold vs warm start of the compiled UNet (needs no Ray)
#   bash benchmarks/gpu_suite.sh graphs     # CUDA graphs vs plain compile (batch 1), VAE slicing (needs no Ray)
#   bash benchmarks/gpu_suite.sh http       # end to end over HTTP: unoptimized vs optimized app, same run
#   bash benchmarks/gpu_suite.sh variants   # each switch alone, xformers, FP8, compiled VAE; batch tuning over HTTP
#   bash benchmarks/gpu_suite.sh scaling    # over HTTP: unoptimized, then the compiled app on 1, 2, 4... replicas
#   bash benchmarks/gpu_suite.sh restart    # over HTTP: the compiled app started cold, then restarted on every GPU
#   bash benchmarks/gpu_suite.sh wait       # over HTTP: batch wait 0.1 vs 0.02 s (1 and 16 clients), then every GPU
#   bash benchmarks/gpu_suite.sh scheduling # over HTTP: step vs request scheduling (closed, open 50/90%, mixed 8/40 steps)
#   bash benchmarks/gpu_suite.sh loras      # in-process: LoRA loads, switches, mixed-adapter steps, recompiles (needs no Ray)
#   bash benchmarks/gpu_suite.sh controlnet # in-process: step-time overhead of ControlNet rows, full-size ControlNet (needs no Ray)
#   bash benchmarks/gpu_suite.sh controlnet_http # over HTTP: a ControlNet variant under load, base + variant sharing one GPU
#   bash benchmarks/gpu_suite.sh refiner    # over HTTP: base-only vs refined latency, half refined under load, replica ratio
#   bash benchmarks/gpu_suite.sh fewstep    # in-process: 4-step unguided requests, compiled with and without the one-row UNet bucket (needs no Ray)
#   bash benchmarks/gpu_suite.sh deepcache  # in-process: deep-feature caching, intervals 2/3/5 eager, then compiled (needs no Ray)
#   bash benchmarks/gpu_suite.sh deepcache_http # over HTTP: a deep-cache deployment, plain requests then interval 3
#   bash benchmarks/gpu_suite.sh deepcache_eager_http # over HTTP: the same uncompiled (ready in seconds), interval 3
#   bash benchmarks/gpu_suite.sh deepcache_default_http # over HTTP: regional compile, interval 3 the deployment's default, cold and warm, beside the unoptimized app
#   bash benchmarks/gpu_suite.sh replica_profile # a Serve replica's UNet calls beside the same engine's in process, kernel by kernel (issue #21's replica gap)
#   bash benchmarks/gpu_suite.sh overhead   # in-process: what an engine step costs besides its UNet call, 1 and 8 images, Euler and DPM++ 2M (needs no Ray)
#   bash benchmarks/gpu_suite.sh hires      # in-process: a 2048² hires image and a batch of 4, VAE tiled vs untiled (needs no Ray)
#   bash benchmarks/gpu_suite.sh training   # in-process: LoRA training steps/s (rank 16, 64), pause latency (needs no Ray)
#   bash benchmarks/gpu_suite.sh soak       # over HTTP: a long mixed load (LoRAs, ControlNet, refiner), GPU memory sampled
#   bash benchmarks/gpu_suite.sh scaleout   # over HTTP, every GPU (issue #20): 1-2-4-8 replicas, LoRA-aware routing, the whole graph, autoscaling
#
# `variants` spreads its four jobs over the visible GPUs (one job a GPU on a 4-GPU host, in turn
# on fewer); every job measures its own fp16 baseline, so each comparison is within one process.
# Wheels the bundle lacks (xformers) are installed from .gpu/whl/ when that folder holds any.
# The device tool returns at most 8 files from $OUT: the steps keep to fewer (one log per step,
# `gpu-STEP.txt`: versions, then everything the step printed).
# Two steps may run at once on one host (e.g. `variants` on GPUs 0-1 and `restart` on 2-3): each
# unpacks the bundle into its own folder and serves HTTP on its own port.
set -uo pipefail
step=${1:?pipeline, startup, graphs, http, variants, scaling, restart, wait, scheduling, loras, controlnet, controlnet_http, refiner, fewstep, deepcache, deepcache_http, deepcache_eager_http, deepcache_default_http, replica_profile, overhead, hires, training, soak or scaleout}
OUT=${OUT:-bench-out/gpu}
site=/tmp/site-$step
# The app imports fastapi-offline, which the shared bundle script does not pack.
if ! compgen -G ".gpu/whl/fastapi_offline-*.whl" >/dev/null; then
  echo "missing .gpu/whl/fastapi_offline-*.whl: pip download fastapi-offline==1.7.7 --no-deps -d .gpu/whl" >&2
  exit 2
fi
mkdir -p "$OUT" "$site"
# A call cut short by its time limit can leave its Ray cluster (and a replica holding the GPU)
# behind on a machine that stays warm for the next call: stop it before measuring anything.
# By process name and by a command line that starts with "ray::" (workers' titles), never by a
# word anywhere in a command line: the device tool's own shell holds the whole command, and
# `pkill -f raylet` killed it (the call returned at once, with no output) whenever that command
# mentioned the word.
{ pkill -x raylet; pkill -x gcs_server; pkill -f '^ray::'; } 2>/dev/null && sleep 2
tar xJf .gpu/bundle.tar.xz -C "$site"
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/whl/*.whl
fi
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1 RAY_worker_niceness=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# Compile caches live in an ignored folder of the checkout, which the device machine keeps between
# calls while it stays warm.
CACHE=$PWD/bench-out/compile-cache
# The unoptimized recipe every step compares against: fp16, PyTorch SDPA, no switches.
base='{"source": "sdxl-arch", "device": "cuda", "dtype": "float16", "attention": "sdpa"}'
# The optimized app's default (FAST_SPEC changes it): compiled UNet and VAE decoder, buckets 1 and
# 8, compile artifacts in the folder given.
compiled() {
  echo '{"source": "sdxl-arch", "device": "cuda", "dtype": "float16", "attention": "sdpa", "optimize": {"channels_last": true, "fuse_qkv": true, "compile": "unet+vae", "batch_buckets": [1, 8], "compile_cache_dir": "'"$1"'"}}'
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
  python3 -c "import ray; print('ray', ray.__version__)" 2>&1 | tail -1
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
  python3 -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
} | tee "$OUT/gpu-$step.txt"
# Everything the step prints goes on into that file as well: a call killed by its time limit
# returns its $OUT, while a caller's pipe (`| tail`) loses what it held (a 10-minute call once
# returned nothing). Not a new file: the device tool returns 8 at most.
exec > >(tee -a "$OUT/gpu-$step.txt") 2>&1
# The card's clocks, power, temperature, load and throttle reasons every 5 s while the step runs:
# two processes on one machine have served 1.5-2x apart (BENCHMARKS.md, scheduling runs 4 and 5),
# and this log says whether the card or the process was slow.
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,memory.used,clocks_event_reasons.active \
  --format=csv -l 5 > "$OUT/gpu-clocks-$step.csv" 2>&1 &
clock_log=$!
# The busiest processes about every 5 s, by their CPU over the last second (top's second sample;
# `ps` gives lifetime averages, which said nothing): a compiled replica's 2-row calls cost
# 0.07-0.09 s served alone and 0.042 s between 16-row calls, so a lone request waits on the host.
(while sleep 4; do date +%T; top -b -n 2 -d 1 -o %CPU -w 160 | awk '/^top -/{n++} n==2' | sed -n 8,13p; done) > "$OUT/cpu-$step.txt" 2>&1 &
cpu_log=$!
trap 'kill $clock_log $cpu_log 2>/dev/null' EXIT
# The GPUs this step may use: those CUDA_VISIBLE_DEVICES names, else all of the host's.
IFS=, read -r -a gpu_ids <<< "${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)}"
gpus=${#gpu_ids[@]}

case "$step" in
pipeline)
  python3 benchmarks/bench_pipeline.py --variants baseline --batches 1,2,4,8,16 --save-reference --tag baseline --out "$OUT"
  python3 benchmarks/bench_pipeline.py --variants cl_qkv,bf16,fp8 --batches 1,8 --reference "$OUT/baseline_seed0.npy" --tag variants --out "$OUT"
  # Cold then warm start of the compiled variant: the same command, an empty cache, then a full one.
  rm -rf "$CACHE"
  for start in cold warm; do
    python3 benchmarks/bench_pipeline.py --variants compile --batches 1,8 --compile-cache "$CACHE" \
      --reference "$OUT/baseline_seed0.npy" --tag "compile_$start" --out "$OUT"
  done
  ;;
startup)
  # Start-up cost of a compiled variant alone (STARTUP_VARIANT, default `compile`; e.g.
  # compile_vae_dynamic: one graph per module for every bucket): an empty cache, then the same
  # process again.
  variant=${STARTUP_VARIANT:-compile}
  rm -rf "$CACHE"
  for start in cold warm; do
    python3 benchmarks/bench_pipeline.py --variants "$variant" --batches 1,8 --compile-cache "$CACHE" --no-stages \
      --tag "${variant}_$start" --out "$OUT"
  done
  ;;
graphs)
  # CUDA graphs (compile mode reduce-overhead) against plain compile at batch 1, the single-request
  # path where launch overhead matters most; VAE slicing against the baseline at batch 8. Needs no Ray.
  python3 benchmarks/bench_pipeline.py --variants baseline,vae_slicing --batches 1,8 --no-stages --save-reference --tag slicing --out "$OUT"
  python3 benchmarks/bench_pipeline.py --variants compile,compile_cudagraphs --batches 1 --no-stages \
    --compile-cache "$CACHE" --reference "$OUT/baseline_seed0.npy" --tag graphs --out "$OUT"
  ;;
http)
  fast=${FAST_SPEC:-'{"source": "sdxl-arch", "device": "cuda", "dtype": "float16", "attention": "sdpa", "optimize": {"channels_last": true, "fuse_qkv": true}}'}
  python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus 4 --ray-cpus 8 --size 1024 --steps 30 \
    --requests ${REQUESTS:-24} --concurrency ${CONCURRENCY:-1,16} --max-batch-size 8 --batch-wait-s 0.1 \
    --model "unoptimized=$base" --model "optimized=$fast" --out "$OUT"
  ;;
variants)
  job_eager() {
    python3 benchmarks/bench_pipeline.py --variants baseline,channels_last,fuse_qkv,xformers,xformers_cl,fp8,fp8_cl \
      --batches 1,8 --tag eager --out "$OUT"
  }
  job_compile_vae() {
    python3 benchmarks/bench_pipeline.py --variants baseline,compile_vae --batches 1,8 --compile-cache "$CACHE" --tag compile_vae --out "$OUT"
  }
  job_fp8_compile() {
    python3 benchmarks/bench_pipeline.py --variants baseline,fp8_compile --batches 1,8 --compile-cache "$CACHE-fp8" --tag fp8_compile --out "$OUT"
  }
  job_tuning() {  # max_batch_size and batch_wait_timeout_s under closed-loop load, one GPU, fp16 SDPA
    python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus 4 --ray-cpus 8 --size 1024 --steps 30 \
      --requests 8 --rounds 2 --batch-wait-s 0.1 \
      --model "mbs4={\"model\": $base, \"max_batch_size\": 4, \"concurrency\": [16]}" \
      --model "mbs8={\"model\": $base, \"max_batch_size\": 8, \"concurrency\": [1, 16]}" \
      --model "mbs8_wait0.02={\"model\": $base, \"batch_wait_s\": 0.02, \"concurrency\": [1]}" \
      --model "mbs16={\"model\": $base, \"max_batch_size\": 16, \"concurrency\": [16, 32]}" \
      --out "$OUT/tuning"
  }
  # JOBS picks some of them (e.g. JOBS="job_fp8_compile job_tuning"); the default runs all four.
  read -r -a jobs <<< "${JOBS:-job_eager job_compile_vae job_fp8_compile job_tuning}"
  rm -rf "$CACHE" "$CACHE-fp8"
  for ((g = 0; g < gpus && g < ${#jobs[@]}; g++)); do
    (
      export CUDA_VISIBLE_DEVICES=${gpu_ids[g]}
      for ((j = g; j < ${#jobs[@]}; j += gpus)); do
        echo "GPU $g: ${jobs[j]}"
        "${jobs[j]}" 2>&1 | sed -u "s/^/[${jobs[j]}] /" >> "$OUT/variants.log"
        echo "GPU $g: ${jobs[j]} exit ${PIPESTATUS[0]}"
      done
    ) &
  done
  wait
  grep -v "INFO\|WARNING\|float32: \[\]\|^\S* *$" "$OUT/variants.log" | tail -n 80
  ;;
scaling)
  # The optimized app on 1, 2, 4, ... replicas of one GPU each, after the unoptimized app on one,
  # all in one run.
  fast=${FAST_SPEC:-$(compiled "$CACHE")}
  models=(--model "unoptimized={\"model\": $base, \"concurrency\": [16]}")
  for ((n = 1; n <= gpus; n *= 2)); do
    models+=(--model "optimized_x$n={\"model\": $fast, \"replicas\": $n, \"concurrency\": [$((16 * n))]}")
  done
  python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus 4 --ray-cpus $((4 * gpus + 4)) --size 1024 --steps 30 \
    --requests 8 --rounds 2 --max-batch-size 8 --batch-wait-s 0.1 "${models[@]}" --out "$OUT/scaling"
  ;;
restart)
  # Cold start of the optimized app on one replica (an empty compile cache), then the app deleted
  # and deployed again on every visible GPU: the restart and scale-out a deployment goes through.
  # Each row's replica_start.compile_cache says whether its compile came from the cache. Its own
  # cache folder, so a `variants` run beside it does not clear it.
  fast=${FAST_SPEC:-$(compiled "$CACHE-restart")}
  rm -rf "$CACHE-restart"
  python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus 4 --ray-cpus $((4 * gpus + 4)) --size 1024 --steps 30 \
    --requests 4 --rounds 2 --max-batch-size 8 --batch-wait-s 0.1 --port 8124 \
    --model "cold_x1={\"model\": $fast, \"replicas\": 1, \"concurrency\": [1]}" \
    --model "warm_x$gpus={\"model\": $fast, \"replicas\": $gpus, \"concurrency\": [1, $((16 * gpus))]}" \
    --out "$OUT/restart"
  ;;
wait)
  # The unoptimized app with batch wait 0.1 vs 0.02 s, one client and sixteen (what a lone request
  # pays for the wait, and whether a short wait costs throughput), then the short wait on every
  # GPU. The Server-Timing split says where a request's time goes.
  python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus 4 --ray-cpus $((4 * gpus + 4)) --size 1024 --steps 30 \
    --requests 8 --rounds 2 --max-batch-size 8 --concurrency 1,16 \
    --model "wait0.1={\"model\": $base, \"batch_wait_s\": 0.1}" \
    --model "wait0.02={\"model\": $base, \"batch_wait_s\": 0.02}" \
    --model "wait0.02_x$gpus={\"model\": $base, \"batch_wait_s\": 0.02, \"replicas\": $gpus, \"concurrency\": [$((16 * gpus))]}" \
    --out "$OUT/wait"
  ;;
scheduling)
  # Step-level vs request-level scheduling of the compiled app (as configs/serve_config.gpu.yaml),
  # full-size SDXL, 1024², 30 steps: a closed loop at 16 clients, Poisson arrivals at 50% and 90%
  # of the request policy's capacity, a half 8-step / half 40-step mix. A cold compile (~5 min)
  # and both policies do not fit one 10-minute call: run it twice on a warm machine, the first
  # with POLICIES=request (compiles, measures the capacity), the second with POLICIES=step
  # CAPACITY=<the first's closed-loop req/s> (the cache is warm: ~70 s to start).
  fast=${FAST_SPEC:-$(compiled "$CACHE")}
  python3 benchmarks/bench_scheduling.py --engine-gpus 1 --engine-cpus 4 --ray-cpus 8 --size 1024 --steps 30 \
    --clients 16 --rounds ${ROUNDS:-2} --open-requests ${OPEN_REQUESTS:-32} --policies ${POLICIES:-request,step} \
    ${CAPACITY:+--capacity $CAPACITY} --model "$fast" --out "$OUT/scheduling"
  ;;
loras)
  # LoRA costs in process (needs no Ray): 30 random rank-64 LoRAs on every UNet attention
  # projection, full-size SDXL, 1024². Eager fp16 first; then (LORAS_COMPILED=1, a second call on
  # the warm machine: two compiled graphs per bucket, base and adapter, take minutes) the compiled
  # UNet with fused QKV as configs/serve_config.gpu.yaml serves it, under `error_on_recompile`.
  if [ -z "${LORAS_COMPILED:-}" ]; then
    python3 benchmarks/bench_loras.py --model "$base" --size 1024 --rank 64 --adapters 30 --out "$OUT/loras-eager"
  else
    python3 benchmarks/bench_loras.py --model "$(compiled "$CACHE" | sed 's/unet+vae/unet/')" --size 1024 --rank 64 \
      --adapters 30 --out "$OUT/loras-compiled"
  fi
  ;;
controlnet)
  # The public SDXL canny ControlNet's architecture with random weights beside the full-size base,
  # eager fp16, 1024²: one steered row, 8 steered rows, 8 rows half steered.
  python3 benchmarks/bench_controlnet.py --model "$base" --controlnet '{"source": "sdxl-arch"}' --size 1024 \
    --out "$OUT/controlnet"
  ;;
controlnet_http)
  # The base and a full-size canny variant deployment at num_gpus 0.5 each (one GPU), eager fp16:
  # the base loaded alone, the variant alone, both at once.
  python3 benchmarks/bench_controlnet_http.py --model "$base" --controlnet '{"source": "sdxl-arch"}' --size 1024 --steps 30 \
    --clients 8 --requests ${REQUESTS:-16} --engine-gpus 0.5 --engine-cpus 4 --ray-cpus 10 --out "$OUT/controlnet_http"
  ;;
refiner)
  # The full-size base and refiner (random weights) at num_gpus 0.5 each on one GPU, eager fp16,
  # 1024², 30 steps, ensemble at 0.8.
  python3 benchmarks/bench_refiner.py --model "$base" --refiner '{"source": "sdxl-arch"}' --size 1024 --steps 30 \
    --switch-at 0.8 --requests ${REQUESTS:-8} --clients 16 --rounds 2 --engine-gpus 0.5 --engine-cpus 4 --ray-cpus 10 --out "$OUT/refiner"
  ;;
fewstep)
  # Few-step serving (issue #21): 4 Euler steps unguided (what SDXL-Lightning/Turbo-style LoRAs
  # run), the served compile against the same with the one-row UNet bucket, batches 1 and 8, in
  # process (needs no Ray). Random weights: this measures cost, not images.
  # FEWSTEP_STEPS="4 8" runs each step count in turn (the second on the first's compile cache);
  # FEWSTEP_BATCHES=1 compiles the batch-1 graphs only (each more bucket is ~90 s of cold compile).
  for steps in ${FEWSTEP_STEPS:-4}; do
    python3 benchmarks/bench_pipeline.py --variants compile_vae,compile_vae_unguided --guidance 1.0 --steps "$steps" \
      --batches "${FEWSTEP_BATCHES:-1,8}" --no-stages --compile-cache "$CACHE" --tag "fewstep_$steps" --out "$OUT"
  done
  ;;
deepcache)
  # Deep-feature caching (issue #21), in process (needs no Ray), 30 steps at 1024²: eager fp16, the
  # baseline and deep_cache_interval 2, 3 and 5 (DEEPCACHE_VARIANTS), each image's PSNR against
  # the baseline's (saved as $OUT/baseline_seed0.npy; DEEPCACHE_REFERENCE names a saved one for a
  # run without the baseline). DEEPCACHE_VARIANTS="compile_vae,compile_vae_deep_cache_3" compares
  # the served compile with and without it (each bucket of each is ~90 s of cold compile:
  # DEEPCACHE_BATCHES=1 first, then 1,8 on the warm cache). DEEPCACHE_SERVED=1 builds each engine
  # as a Serve replica does (its warm-up, timed call costs and LoRA slot layers), without Ray;
  # DEEPCACHE_REPLICA_THREADS=1 also builds it on a thread of its own and runs its loop on another.
  # PROFILE_WARMUP=1 (with DEEPCACHE_SERVED=1) profiles one UNet call per bucket after the warm-up,
  # as `deepcache_default_http` does in the replica with the same switch: compare the two.
  reference=()
  [ -n "${DEEPCACHE_REFERENCE:-}" ] && reference=(--reference "$DEEPCACHE_REFERENCE")
  served=()
  [ "${DEEPCACHE_SERVED:-0}" = 1 ] && served=(--served)
  [ "${DEEPCACHE_REPLICA_THREADS:-0}" = 1 ] && served+=(--replica-threads)
  [ "${PROFILE_WARMUP:-0}" = 1 ] && served+=(--profile-warmup)
  python3 benchmarks/bench_pipeline.py --variants "${DEEPCACHE_VARIANTS:-baseline,deep_cache_2,deep_cache_3,deep_cache_5}" \
    --batches "${DEEPCACHE_BATCHES:-1,8}" --no-stages --compile-cache "$CACHE" --save-reference "${reference[@]}" "${served[@]}" \
    --tag "deepcache_${DEEPCACHE_TAG:-eager}" --out "$OUT"
  ;;
deepcache_http)
  # Deep-feature caching over HTTP: the served compile with `deep_cache` on, plain requests, then
  # the same deployment restarted (compile cache warm) with every request at interval 3; a lone
  # client and 16 (CONCURRENCY). One compiled replica, step scheduling.
  cached=$(compiled "$CACHE" | sed 's/"batch_buckets": \[1, 8\]/"batch_buckets": [1, 8], "deep_cache": true/')
  python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus 4 --ray-cpus 8 --size 1024 --steps 30 \
    --requests ${REQUESTS:-24} --concurrency ${CONCURRENCY:-1,16} --max-batch-size 8 \
    --model "plain={\"model\": $cached}" --model "interval3={\"model\": $cached, \"request\": {\"deep_cache_interval\": 3}}" \
    --out "$OUT"
  ;;
deepcache_eager_http)
  # Deep-feature caching over HTTP with nothing compiled: the replica is ready without minutes of
  # compiling (#21's cold start). The spec of the in-process eager run that served 1.82 img/s at
  # batch 8 (interval 3), so the two compare; no buckets (they need compile). Every request at
  # interval 3; a lone client, then 16 (CONCURRENCY).
  eager='{"source": "sdxl-arch", "device": "cuda", "dtype": "float16", "attention": "sdpa", "optimize": {"deep_cache": true}}'
  python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus 4 --ray-cpus 8 --size 1024 --steps 30 \
    --requests ${REQUESTS:-12} --rounds 2 --concurrency ${CONCURRENCY:-1,16} --max-batch-size 8 \
    --model "eager_interval3={\"model\": $eager, \"request\": {\"deep_cache_interval\": 3}}" \
    --out "$OUT"
  ;;
deepcache_default_http)
  # Issue #21's candidate for a shipped GPU config: the UNet's transformer blocks compiled
  # (regional: seconds, not minutes), a lone image's UNet calls replayed from CUDA graphs, deep
  # caching at interval 3 as the deployment's default (`model.default_deep_cache_interval`; the
  # requests send nothing). Cold from an empty compile cache (a lone client, then 16), deployed
  # again on the warm cache (its ready time; a lone client), then the unoptimized app (BASELINE=0
  # leaves it out), all in one run. CANDIDATE_SPEC replaces the spec (its compile_cache_dir
  # should be "$CACHE-regional", emptied first); ENGINE_CPUS sets the replica's num_cpus (Ray sets
  # its OMP_NUM_THREADS to it; default 4); WARM_CONCURRENCY the warm deployment's client counts
  # (default 1; e.g. 1,16); EXACT=1 deploys it a third time with every request sending
  # deep_cache_interval 1 (exact images: what the same replica serves to clients that opt out).
  rm -rf "$CACHE-regional"
  engine_cpus=${ENGINE_CPUS:-4}
  candidate=${CANDIDATE_SPEC:-'{"source": "sdxl-arch", "device": "cuda", "dtype": "float16", "attention": "sdpa", "default_deep_cache_interval": 3, "optimize": {"channels_last": true, "fuse_qkv": true, "compile": "unet", "compile_scope": "regional", "batch_buckets": [1, 8], "deep_cache": true, "cuda_graphs": true, "compile_cache_dir": "'"$CACHE-regional"'"}}'}
  # PROFILE_WARMUP=1: the replica profiles one UNet call per bucket after its warm-up (`profile`
  # in the JSON's replica_start), to set beside the same in process (`deepcache` above).
  [ "${PROFILE_WARMUP:-0}" = 1 ] && candidate=$(echo "$candidate" | sed 's/"deep_cache": true/"deep_cache": true, "profile_warmup": true/')
  baseline=(--model "unoptimized={\"model\": $base}")
  [ "${BASELINE:-1}" = 0 ] && baseline=()
  exact=()
  [ "${EXACT:-0}" = 1 ] && exact=(--model "regional_exact={\"model\": $candidate, \"request\": {\"deep_cache_interval\": 1}}")
  python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus "$engine_cpus" --ray-cpus $((engine_cpus + 4)) \
    --size 1024 --steps 30 --requests ${REQUESTS:-12} --rounds 2 --concurrency ${CONCURRENCY:-1,16} --max-batch-size 8 \
    --model "regional_dc3_cold={\"model\": $candidate}" --model "regional_dc3_warm={\"model\": $candidate, \"concurrency\": [${WARM_CONCURRENCY:-1}]}" \
    "${exact[@]}" "${baseline[@]}" --out "$OUT"
  ;;
replica_profile)
  # Where a Serve replica's 16-row UNet call spends the time it does not spend in process (issue
  # #21's replica gap): the regional, deep-cache spec built as a replica builds it, in process
  # (bench_pipeline --served) and in a Serve replica (bench_http, one lone client), each profiling
  # one UNet call per bucket after its warm-up (optimize.profile_warmup); then both side by side.
  spec='{"source": "sdxl-arch", "device": "cuda", "dtype": "float16", "attention": "sdpa", "default_deep_cache_interval": 3, "optimize": {"channels_last": true, "fuse_qkv": true, "compile": "unet", "compile_scope": "regional", "batch_buckets": [1, 8], "deep_cache": true, "profile_warmup": true, "compile_cache_dir": "'"$CACHE-regional"'"}}'
  python3 benchmarks/bench_pipeline.py --variants compile_regional_deep_cache_3 --batches 1,8 --no-stages --served \
    --profile-warmup --compile-cache "$CACHE-regional" --tag replica_profile --out "$OUT"
  python3 benchmarks/bench_http.py --skip-direct --engine-gpus 1 --engine-cpus 4 --ray-cpus 8 --size 1024 --steps 30 \
    --requests 4 --rounds 1 --concurrency 1 --max-batch-size 8 --model "replica={\"model\": $spec}" --out "$OUT"
  python3 benchmarks/compare_profiles.py "$OUT/bench_pipeline_replica_profile.json" "$OUT/bench_http.json" --rows 16 --out "$OUT"
  ;;
overhead)
  # The engine loop's own cost per step (issue #21's "per-step Python overhead"): eager fp16, 1024²,
  # 1 and 8 guided images, Euler and DPM++ 2M; the UNet timed apart, the device synchronized.
  python3 benchmarks/bench_engine_overhead.py --model "$base" --size 1024 --images 1,8 --out "$OUT"
  ;;
hires)
  # 30 steps at 1024², then 15 at 2048² (38 scheduler steps at strength 0.4), eager fp16: one image
  # and a batch of 4, the VAE tiled above 1024² (the served default) and untiled.
  # HIRES_COMPILED=unet (or unet+vae): one image with the UNet (and the VAE decoder) compiled
  # (fused QKV, channels last; the first run compiles the 1024² and 2048² graphs, and with the VAE
  # its tile shapes), the VAE tiled as served; HIRES_UPSCALER=latent skips the VAE round trip.
  if [ -z "${HIRES_COMPILED:-}" ]; then
    python3 benchmarks/bench_hires.py --model "$base" --size 1024 --target 2048 --steps 30 --hires-steps 38 --strength 0.4 \
      --batches 1,4 --repeats 2 --upscaler "${HIRES_UPSCALER:-lanczos}" --out "$OUT/hires"
  else
    python3 benchmarks/bench_hires.py --model "$(compiled "$CACHE" | sed "s/unet+vae/$HIRES_COMPILED/")" --size 1024 --target 2048 \
      --steps 30 --hires-steps 38 --strength 0.4 --batches 1 --repeats 3 --vae tiled --upscaler "${HIRES_UPSCALER:-lanczos}" \
      --out "$OUT/hires-compiled"
  fi
  ;;
soak)
  # A long mixed load on one GPU (base, sdxl-arch canny variant and refiner at num_gpus 0.3 each,
  # 3 random rank-16 LoRAs, 1024², 20 steps): each engine's torch GPU memory and every process's
  # RSS sampled every 24 requests (issue #19: memory stays flat).
  python3 benchmarks/bench_overload.py --parts soak --model "$base" --engine-gpus 0.3 --size 1024 --steps 20 --loras 3 \
    --soak ${SOAK:-240} --every 24 --ray-cpus 10 --out "$OUT/soak"
  ;;
scaleout)
  # Issue #20 on every visible GPU, one per engine replica: configs/serve_config.gpu.yaml as
  # shipped (compiled UNet + VAE, CL, QKV, buckets [1, 8], LoRA slots, step scheduling) with
  # full-size random weights (sdxl-arch, its canny ControlNet and refiner), 1024², 30 steps, 16
  # clients per GPU. The four parts do not fit one 10-minute call: run one call per line on a
  # warm machine (the compile cache in $CACHE-scaleout carries over; each call its own folder):
  #   PARTS=replicas REPLICAS=1            (cold compile with both LoRA branches; cut short? run it again: the cache keeps what finished)
  #   PARTS=replicas REPLICAS=2,4 BASELINE=<the x1 img/s>      then      PARTS=replicas REPLICAS=8 BASELINE=...
  #   PARTS=routing                        (30 random rank-16 LoRAs over 4 replicas caching 8; multiplexed, then Ray's default)
  #   PARTS=graph                          (base 4, canny 2, refiner 2 on 8 GPUs; compiles the variant, the refiner and 2048² hires: cold, twice)
  #   PARTS=autoscale                      (1 -> 4 GPUs' worth of clients: 8 -> 32, the config's target 8; scale-down after 60 s)
  # DURATION (seconds a measurement, default 90) and ROUTING_CLIENTS (default 16 a replica; fewer: replicas left free to prefer) change them.
  parts=${PARTS:-replicas,routing,graph,autoscale}
  python3 benchmarks/bench_scaleout.py --model '{"source": "sdxl-arch"}' --compile-cache "$CACHE-scaleout" --parts "$parts" \
    ${REPLICAS:+--replicas $REPLICAS} ${BASELINE:+--baseline-img-s $BASELINE} ${DURATION:+--duration-s $DURATION} \
    ${ROUTING_CLIENTS:+--routing-clients $ROUTING_CLIENTS} --out "$OUT/scaleout-${parts//,/-}${REPLICAS:+-x${REPLICAS//,/-}}"
  ;;
training)
  # LoRA training on the full-size base (random weights), eager fp16, 1024²: steps/s at rank 16
  # and 64, a request's wait for its first step while a job trains, latency with a job paused.
  python3 benchmarks/bench_training.py --model "$base" --resolution 1024 --ranks 16,64 --steps 10 --requests 8 \
    --out "$OUT/training"
  ;;
esac
