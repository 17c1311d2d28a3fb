"""How long `vae-train` takes from start to a served artifact, and where the time goes.

Two runs, each a real `vae-train` process writing to a temporary folder, the default anomaly
score fitted around the shipped score base (no fonts are read):
- quick: 1 epoch on 2,000 images (`--train-limit 2000 --eval-limit 200`);
- seed: the reference recipe, vae-train's defaults (MLP, 30 epochs, all 60,000 images).
For each: the wall time, the epochs' total, and the end phase (evaluation, score, export,
pictures) as the run prints it.

    python -m bench.train_time [--data-dir ../shared/data/mnist] [--only quick]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "quick": ["--epochs", "1", "--train-limit", "2000", "--eval-limit", "200"],
    "seed": [],
}


def run(name: str, extra: list[str], data_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"{name}.pt"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "training.train", "--data-dir", str(data_dir), "--no-download",
                               "--no-progress", "--out", str(out), *extra], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{name}: vae-train exited {done.returncode}\n{done.stderr[-2000:]}")
        report = json.loads(out.with_suffix(".metrics.json").read_text())
        epochs = sum(e["seconds"] for e in report["epochs"])
        end = re.search(r"^end phase: (.*)$", done.stdout, re.M)
        phases = dict((k, float(v)) for k, v in re.findall(r"([a-z ]+) ([\d.]+) s", end[1])) if end else {}
        meta = json.loads(subprocess.run(
            [sys.executable, "-c", "import json, pathlib, sys; from training import export; "
             "print(json.dumps(export.load(pathlib.Path(sys.argv[1]))[1]))", str(out)],
            capture_output=True, text=True, check=True).stdout)
        print(f"{name}: {wall:.0f} s in all; {len(report['epochs'])} epoch(s) {epochs:.1f} s; end phase "
              f"{sum(phases.values()):.1f} s ({', '.join(f'{k.strip()} {v:.1f} s' for k, v in phases.items())}); "
              f"default score: {meta.get('anomaly_scores', {}).get('default', 'none')}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--only", choices=sorted(RUNS), default=None)
    args = p.parse_args()
    for name, extra in RUNS.items():
        if args.only in (None, name):
            run(name, extra, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
