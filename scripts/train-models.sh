#!/usr/bin/env bash
# Trains the two shipped models exactly as models/README.md states (CPU, 2 cores: about 1.5 minutes
# for vae-2d and about 50 minutes for vae, plus a few minutes of evaluation each), then, where a GPU
# is present, refits their default anomaly score with a distilled digit head as shipped (about a
# minute each on an H100; on a CPU that step would take hours, so without a GPU it is skipped and the
# plain score that vae-train fits is kept).
set -euo pipefail
DATA=${DATA:-../shared/data/mnist}
vae-train --data-dir "$DATA" --arch mlp --latent-dim 2 --hidden 512 --epochs 30 --lr 2e-3 --binarize none \
  --seed 1 --out models/vae-2d.pt "$@"
vae-train --data-dir "$DATA" --arch deep --latent-dim 32 --hidden 512 --iw-k 5 --binarize dynamic \
  --schedule cosine --epochs 300 --seed 1 --out models/vae.pt "$@"
if python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  vae-fit-score models/vae-2d.pt --data-dir "$DATA" --distil-views 17 --device cuda
  vae-fit-score models/vae.pt --data-dir "$DATA" --distil-views 17 --distil-teachers 3 --device cuda
else
  echo "no GPU: the plain anomaly score is kept (vae-fit-score --distil-views 17 --device cuda refits it)"
fi
