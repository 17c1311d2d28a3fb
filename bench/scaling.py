"""Requests/s against the number of worker processes: does throughput grow with cores?

For each VAE_WORKERS value (and each device), starts `vae-serve` as bench/serve.py does and drives
`POST /encode` and `POST /anomaly-score` (the same digit, raw PNG) with wrk at one concurrency,
printing req/s and the gain over one worker (and the anomaly score's plain bound, for its cost).
On a GPU machine, `--device cpu cuda` gives both curves in one run
(docs/performance.md#cpu-scaling-and-a-gpu-used-whole says what to look for).

    python -m bench.scaling [--workers 1 2 4 8 16] [--device cpu] [--concurrency 64] [--duration 5]
"""

from __future__ import annotations

import argparse
import os

from bench.serve import run

ENDPOINTS = ["POST /encode (raw PNG)", "POST /anomaly-score", "POST /anomaly-score?method=bound"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=int, default=5)
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs; wrk -c {args.concurrency} on the same machine; {args.duration} s per figure")
    print("| device | workers | endpoint | req/s | x one worker | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for device in args.device:
        os.environ["VAE_DEVICE"] = device  # bench.serve starts vae-serve with this environment
        first: dict[str, float] = {}
        for workers in args.workers:
            rows = run("on", args.duration, [args.concurrency], ["encode (raw", "POST /anomaly-score"], workers)
            for r in rows:
                if r["endpoint"] not in ENDPOINTS:
                    continue
                first.setdefault(r["endpoint"], r["rps"])
                gain = r["rps"] / first[r["endpoint"]]
                print(f"| {device} | {workers} | {r['endpoint']} | {r['rps']:.0f} | {gain:.2f} | {r['p50_ms']:.2f} | "
                      f"{r['p99_ms']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
