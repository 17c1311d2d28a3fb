#!/usr/bin/env bash
# Trains the two shipped models exactly as models/README.md states (CPU, 2 cores: about 1.5 minutes
# for vae-2d and about 50 minutes for vae, plus a few minutes of evaluation each).
set -euo pipefail
DATA=${DATA:-../shared/data/mnist}
vae-train --data-dir "$DATA" --arch mlp --latent-dim 2 --hidden 512 --epochs 30 --lr 2e-3 --binarize none \
  --seed 1 --out models/vae-2d.pt "$@"
vae-train --data-dir "$DATA" --arch deep --latent-dim 32 --hidden 512 --iw-k 5 --binarize dynamic \
  --schedule cosine --epochs 300 --seed 1 --out models/vae.pt "$@"
