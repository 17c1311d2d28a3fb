#!/usr/bin/env bash
# Trains the two shipped models exactly as models/README.md states (CPU, 2 cores: about 1.5 minutes
# for vae-2d and about 50 minutes for vae, plus a minute or two of evaluation and score fitting
# each), their default anomaly score fitted around the shipped score base (models/score-base-v1.pth).
# REBUILD_BASE=1 first builds that base again: its distilled digit head needs a GPU (about a minute on
# an H100; hours on a CPU), its glyph ratio Debian's fonts (about 15 minutes on 2 cores).
set -euo pipefail
DATA=${DATA:-../shared/data/mnist}
if [ "${REBUILD_BASE:-0}" = 1 ]; then
  vae-build-score-base --data-dir "$DATA" --distil-views 17 --distil-teachers 3 --device cuda
fi
vae-train --data-dir "$DATA" --arch mlp --latent-dim 2 --hidden 512 --epochs 30 --lr 2e-3 --binarize none \
  --seed 1 --eval-k 1000 --out models/vae-2d.pt "$@"
vae-train --data-dir "$DATA" --arch deep --latent-dim 32 --hidden 512 --iw-k 5 --binarize dynamic \
  --schedule cosine --epochs 300 --seed 1 --eval-k 1000 --out models/vae.pt "$@"
