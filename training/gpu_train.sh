#!/usr/bin/env bash
# Trains the tiny model family on a lent GPU host (see ../shared/gpu/README.md for the bundle) and
# leaves the result under $OUT as a tarball split into 15 MB parts (the device tool returns at most
# 16 MiB a file). Extra arguments go to training.train_tiny, e.g. --budget-s base=250.
#
#   bash training/gpu_train.sh --budget-s vae=70 base=250 controlnet=100 lora=45
#   cat $FILES/weights.tar.part-* | tar xf - -C configs     # back on the development machine
set -euo pipefail
mkdir -p /tmp/site && tar xJf .gpu/bundle.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
work=/tmp/tiny-train
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
python3 -m training.train_tiny --out "$work" --device cuda "$@" 2>&1 | grep -v "Writing model shards" | tee "$OUT/train.log" || status=$?
# Stages save as they finish: return what exists even when a later stage failed.
[ -d "$work" ] && tar cf - -C "$work" . | split -b 15m - "$OUT/weights.tar.part-"
exit $status
