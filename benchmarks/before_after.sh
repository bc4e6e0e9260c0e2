#!/bin/bash
# A change's cost to the jobs' speed: an older commit against this checkout, alternating, 3 rounds, one line per run.
#
#   bash benchmarks/before_after.sh OLD_CLONE   # OLD_CLONE: a clone at the older commit, with its own .venv
#
# Labeling: 612 full-resolution photos (../shared's val set 4 times, hard links), a random-weight ResNet18, fp32:
# images/s after start-up, start-up seconds, rows. Training: configs/train.yaml on ../shared's 245 train photos,
# random weights, 2 epochs, 1 worker: the second epoch's train images/s, its seconds, its images. Compare the
# medians of each side.
set -euo pipefail
OLD=$(cd "$1" && pwd)
NEW=$(cd "$(dirname "$0")/.." && pwd)
SHARED=$NEW/../shared/data/hymenoptera
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
for c in 0 1 2 3; do for cls in ants bees; do
  mkdir -p "$W/val4/$c/$cls" && ln "$SHARED/val/$cls/"* "$W/val4/$c/$cls/"
done; done
mkdir "$W/ckpt"
(cd "$NEW" && .venv/bin/python -c "from tests.helpers import random_weight_checkpoint as r; r('resnet18', ['ants', 'bees'], '$W/ckpt')")
for round in 1 2 3; do
  for side in old new; do
    repo=$([ $side = old ] && echo "$OLD" || echo "$NEW")
    rm -rf "$W/out" "$W/runs"
    (cd "$repo" && CUDA_VISIBLE_DEVICES= .venv/bin/python -m jobs.cli label --checkpoint "$W/ckpt/checkpoint.pt" \
       --input "$W/val4" --output "$W/out" --precision fp32 > "$W/label.log" 2>&1)
    python3 -c "import json; s = json.load(open('$W/out/_summary.json'))['runs'][-1]
print('label $side round $round', s['images_per_s_after_startup'], s['startup_seconds'], s['labeled'])"
    (cd "$repo" && CUDA_VISIBLE_DEVICES= .venv/bin/python -m jobs.cli train -c configs/train.yaml name=ab \
       "data.root=$SHARED" model.weights=none train.epochs=2 "storage.path=$W/runs" > "$W/train.log" 2>&1)
    python3 -c "import json; e = json.load(open('$W/runs/ab/summary.json'))['epochs'][-1]
print('train $side round $round', round(e['images_per_s'], 2), round(e['epoch_seconds'], 1), e['train_images'])"
  done
done
