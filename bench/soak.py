"""Soak and shutdown: sustained mixed load, memory over time, then SIGTERM under load.

1. Starts `python -m app.cli` (vae-serve) on loopback with the bundled models.
2. Soak: `--seconds` (60) at `--concurrency` (64) with an httpx async loop mixing every
   endpoint; counts statuses; resident memory (VmRSS of the service and its processes)
   after warm-up, every `--sample-every` seconds, and at the end. `--hostile` mixes in the
   requests of tests/hostile.py (text-chunk bombs, scan bombs, oversized and deep JSON, a
   lying header, an icon hiding a huge PNG, the largest anomaly score): each must get its
   4xx or 504, never a 500, and every ordinary request a 200.
3. Drain: load at concurrency 16 over keep-alive connections, SIGTERM after 2 s; every
   request sent before the drain delay (VAE_DRAIN_DELAY_S) ends must be answered, later ones
   may be refused (connection errors: nobody listens any more), and the process must exit 0
   within the grace period.
Bounded (fixed duration, fixed workers), loopback only.

    python -m bench.soak [--seconds 60] [--concurrency 64] [--hostile]  (VAE_WORKERS=2 etc. pass through)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from app.settings import Settings
from bench.serve import free_port, start_server
from tests import hostile

REPO = Path(__file__).resolve().parents[1]
DIGIT = (REPO / "tests" / "data" / "mnist_test_0_digit_7.png").read_bytes()
PHOTO = (REPO / "tests" / "data" / "photo_dark_on_light_digit_4.jpg").read_bytes()


def rss_mb(pid: int) -> float:
    """Resident memory of the process and its descendants (the workers, with VAE_WORKERS > 1)."""
    total = next((int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:")), float("nan"))
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += rss_mb(int(child))
    return total


def requests_mix(latent_dim: int) -> list[tuple[str, str, dict]]:
    png = {"content": DIGIT, "headers": {"content-type": "image/png"}}
    pair = [("file", ("a.png", DIGIT, "image/png")), ("file", ("b.jpg", PHOTO, "image/jpeg"))]
    return [
        ("POST", "/encode", png),
        ("POST", "/encode", {"files": pair}),
        ("POST", "/encode", {"json": {"images": [base64.b64encode(DIGIT).decode()]}}),
        ("POST", "/decode?format=png", {"json": {"z": [[0.1] * latent_dim] * 4}}),
        ("GET", "/sample?n=16", {}),
        ("GET", "/sample?n=4&format=json&seed=1", {}),
        ("POST", "/reconstruct", png),
        ("POST", "/anomaly-score", png),
        ("POST", "/anomaly-score?k=256", {"content": PHOTO, "headers": {"content-type": "image/jpeg"}}),
    ]


def hostile_mix() -> list[tuple[str, str, dict]]:
    """One of each request of tests/hostile.py, built once: ("!" marks them in the counts)."""
    as_json = {"content-type": "application/json"}
    return [
        ("POST", "/encode!", {"content": hostile.text_bomb_png(50), "headers": {"content-type": "image/png"}}),
        ("POST", "/encode!", {"content": hostile.scan_bomb_jpeg(4000, 1500),
                              "headers": {"content-type": "image/jpeg"}}),
        ("POST", "/decode?model=vae-2d!", {"content": hostile.many_latents_json(), "headers": as_json}),
        ("POST", "/encode!", {"content": hostile.deep_json(), "headers": as_json}),
        ("POST", "/v2/models/vae.encode/infer!", {"content": b'{"inputs": []}', "headers": {
            **as_json, "inference-header-content-length": b"\xb2"}}),
        ("POST", "/encode!", {"content": hostile.ico_hiding(hostile.huge_png(5000, 5000)),
                              "headers": {"content-type": "image/x-icon"}}),
        ("POST", "/anomaly-score?k=1000!", {"files": [("file", ("d.png", DIGIT, "image/png"))] * 64}),
    ]


async def load(base: str, mix: list, workers: int, seconds: float, statuses: Counter, stop: asyncio.Event,
               failures: list[float] | None = None) -> None:
    """Requests from `workers` keep-alive connections; `failures` gets the send time of each that failed."""
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        async def worker(i: int) -> None:
            n = i
            while time.monotonic() < deadline and not stop.is_set():
                method, path, kwargs = mix[n % len(mix)]
                n += 1
                sent = time.monotonic()
                hostile_one = path.endswith("!")
                try:
                    r = await client.request(method, path.rstrip("!"), **kwargs)
                    statuses[f"hostile {r.status_code}" if hostile_one else r.status_code] += 1
                except httpx.HTTPError as e:
                    statuses[f"hostile {type(e).__name__}" if hostile_one else type(e).__name__] += 1
                    if failures is not None:
                        failures.append(sent)
                    if stop.is_set():
                        return
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(worker(i) for i in range(workers)))


async def soak(args: argparse.Namespace) -> None:
    port = free_port()
    proc = start_server(port, {})
    base = f"http://127.0.0.1:{port}"
    latent_dim = next(m["latent_dim"] for m in httpx.get(f"{base}/models").json()["models"] if m["name"] == "vae")
    mix = requests_mix(latent_dim)
    if args.hostile:
        mix = [*mix, *hostile_mix()]
    stop = asyncio.Event()
    statuses: Counter = Counter()
    await load(base, mix, args.concurrency, 5, Counter(), stop)  # warm-up
    rss_start = rss_mb(proc.pid)
    t0 = time.monotonic()
    samples: list[tuple[float, float]] = []

    async def sample() -> None:
        while True:
            samples.append((time.monotonic() - t0, rss_mb(proc.pid)))
            print(f"soak: {samples[-1][0]:6.0f} s  RSS {samples[-1][1]:.1f} MB", flush=True)
            await asyncio.sleep(args.sample_every)

    sampler = asyncio.create_task(sample())
    await load(base, mix, args.concurrency, args.seconds, statuses, stop)
    sampler.cancel()
    elapsed = time.monotonic() - t0
    rss_end = rss_mb(proc.pid)
    if len(samples) >= 6:  # growth per minute in the first and the last third: levelling off or not
        third = len(samples) // 3
        rate = [60 * (b[1] - a[1]) / (b[0] - a[0]) for a, b in ((samples[0], samples[third]),
                                                                   (samples[-third - 1], samples[-1]))]
        print(f"soak: RSS growth {rate[0]:+.2f} MB/min in the first third, {rate[1]:+.2f} MB/min in the last")
    total = sum(statuses.values())
    print(f"soak: {args.seconds} s at concurrency {args.concurrency}, {total} requests ({total / elapsed:.0f}/s), "
          f"statuses {dict(statuses)}")
    print(f"soak: RSS after warm-up {rss_start:.1f} MB, at the end {rss_end:.1f} MB "
          f"({100 * (rss_end - rss_start) / rss_start:+.2f}%)")

    # Drain: SIGTERM in the middle of load. The service answers for VAE_DRAIN_DELAY_S more (default 5 s),
    # then stops accepting: a request sent after that may fail (nobody is listening), one sent before must not.
    drain: Counter = Counter()
    failures: list[float] = []
    task = asyncio.create_task(load(base, mix, 16, 30, drain, stop, failures))
    await asyncio.sleep(2)
    before = sum(drain.values())
    t_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 60)
    exit_s = time.monotonic() - t_term
    stop.set()
    await task
    delay = Settings().drain_delay_s
    lost = sum(sent < t_term + delay for sent in failures)
    print(f"drain: {before} requests answered before SIGTERM; after it: statuses {dict(drain)} in all; "
          f"process exited with {code} after {exit_s:.2f} s; failed requests sent before the drain delay "
          f"({delay:g} s) ended: {lost}; failed after it (the server had stopped listening): {len(failures) - lost}")
    hostile_ok = all(not k.startswith("hostile 5") or k == "hostile 504" for k in statuses if isinstance(k, str))
    ordinary_ok = all(k == 200 if isinstance(k, int) else k.startswith("hostile") for k in statuses)
    ok = code == 0 and hostile_ok and ordinary_ok and \
        all(k == 200 or k == 503 for k in drain if isinstance(k, int)) and lost == 0
    print("PASS" if ok else "FAIL")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--hostile", action="store_true", help="mix in the requests of tests/hostile.py")
    p.add_argument("--sample-every", type=float, default=60, help="seconds between RSS samples")
    asyncio.run(soak(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
