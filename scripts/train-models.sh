#!/usr/bin/env bash
# Trains the two shipped models exactly as models/README.md states. CPU: about 25 minutes on 2 cores.
set -euo pipefail
DATA=${DATA:-../shared/data/mnist}
vae-train --data-dir "$DATA" --arch mlp --latent-dim 2 --hidden 400 --epochs 30 --binarize none --schedule cosine \
  --out models/vae-2d.pt "$@"
vae-train --data-dir "$DATA" --arch deep --latent-dim 32 --hidden 512 --iw-k 5 --binarize dynamic \
  --schedule cosine --epochs 100 --out models/vae.pt "$@"
