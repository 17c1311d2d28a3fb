"""What one hostile or careless request costs the service: its answer, and everybody else's wait.

For each request of tests/hostile.py, sent alone to a fresh `vae-serve` (default settings, the
bundled models): the status and the time to answer it; the stall, i.e. the longest a `GET
/healthz` on its own connection waited while it ran (asked every 20 ms); and the service's
resident memory (with its decoder processes) before and after. Then two scan bombs followed
by an ordinary photo, which must not wait for the bombs.

    python -m bench.hostile [--repo DIR] [--quick]

--repo runs the server of another checkout (say, a worktree of an older commit) with the same
requests: before and after on one machine. --quick sends the smaller variants (0.44 MB text
chunks instead of 8.8 MB, 1,500 scan repeats instead of 12,000).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.serve import free_port, wait_ready
from bench.soak import rss_mb
from tests import hostile

REPO = Path(__file__).resolve().parents[1]
PHOTO = (REPO / "tests" / "data" / "photo_dark_on_light_digit_4.jpg").read_bytes()
JSON = {"content-type": "application/json"}


def requests(quick: bool) -> list[tuple[str, str, str, bytes, dict[str, str]]]:
    """(label, method, path, body, headers) for each request of the issue's table that one client sends."""
    text_chunks = 50 if quick else 1000
    repeats = 1500 if quick else 12_000
    part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + hostile.DIGIT + b"\r\n")
    many_files = part * 64 + b"--b--\r\n"
    return [
        (f"1 PNG + {text_chunks} zTXt chunks", "POST", "/encode", hostile.text_bomb_png(text_chunks),
         {"content-type": "image/png"}),
        ("2 1.7 M latents (8.5 MB JSON)", "POST", "/decode?model=vae-2d", hostile.many_latents_json(), JSON),
        ("2 6,000 pixel images (JSON)", "POST", "/encode", hostile.many_pixels_json(6000), JSON),
        ("2 10^6 numbers to /v2 infer", "POST", "/v2/models/vae.encode/infer", hostile.many_numbers_infer_json(),
         JSON),
        ("2 /sample?n=256&format=json", "GET", "/sample?n=256&format=json", b"", {}),
        (f"3 scan-bomb JPEG ({repeats} scans)", "POST", "/encode", hostile.scan_bomb_jpeg(4000, repeats),
         {"content-type": "image/jpeg"}),
        ("4 ICO hiding a 24000x24000 PNG", "POST", "/encode", hostile.ico_hiding(hostile.huge_png(24000, 24000)),
         {"content-type": "image/x-icon"}),
        ("5 64 files at k=1000", "POST", "/anomaly-score?k=1000", many_files,
         {"content-type": "multipart/form-data; boundary=b"}),
        ("6 JSON 100,000 deep", "POST", "/encode", hostile.deep_json(), JSON),
        ("7 header length '²'", "POST", "/v2/models/vae.encode/infer", b'{"inputs": []}',
         {**JSON, "inference-header-content-length": "\xb2"}),
        ("10 Host: attacker.example", "GET", "/models", b"", {"host": "attacker.example"}),
    ]


async def one(base: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, float, float]:
    """(status, seconds to answer, longest /healthz wait meanwhile)."""
    async with httpx.AsyncClient(base_url=base, timeout=300) as client, \
            httpx.AsyncClient(base_url=base, timeout=300) as probe:
        start = time.perf_counter()
        task = asyncio.create_task(client.request(method, path, content=body or None,
                                                  headers={k: v.encode("latin-1") for k, v in headers.items()}))
        stall = 0.0
        while not task.done():
            t = time.perf_counter()
            await probe.get("/healthz")
            stall = max(stall, time.perf_counter() - t)
            await asyncio.sleep(0.02)
        answer = await task
        return answer.status_code, time.perf_counter() - start, stall


async def bombs_then_photo(base: str, bomb: bytes) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        jpeg = {"content-type": "image/jpeg"}
        start = time.perf_counter()
        bombs = [asyncio.create_task(client.post("/encode", content=bomb, headers=jpeg)) for _ in range(2)]
        await asyncio.sleep(0.5)
        t = time.perf_counter()
        photo = await client.post("/encode", content=PHOTO, headers=jpeg)
        photo_s = time.perf_counter() - t
        answers = await asyncio.gather(*bombs)
        return (f"two scan bombs, then a photo: photo {photo.status_code} in {photo_s:.3f} s; bombs "
                f"{[a.status_code for a in answers]} after {time.perf_counter() - start:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose server to run")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    port = free_port()
    env = {**os.environ, "VAE_LOG_LEVEL": "error", "VAE_PORT": str(port), "VAE_MODELS_DIR": str(REPO / "models")}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli"], cwd=args.repo, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, f"{base}/readyz", "server")
        commit = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=args.repo, text=True, capture_output=True)
        print(f"server: {args.repo} ({commit.stdout.strip()})")
        print("| request | status | answered in | /healthz stall | RSS before -> after |")
        print("| --- | --- | --- | --- | --- |")
        for label, method, path, body, headers in requests(args.quick):
            before = rss_mb(proc.pid)
            status, took, stall = asyncio.run(one(base, method, path, body, headers))
            print(f"| {label} | {status} | {took:.2f} s | {stall * 1000:.0f} ms | {before:.0f} -> "
                  f"{rss_mb(proc.pid):.0f} MB |", flush=True)
        print(asyncio.run(bombs_then_photo(base, hostile.scan_bomb_jpeg(4000, 1500 if args.quick else 12_000))))
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
