"""Per-request cost of one route in-process: the app called directly as ASGI, no sockets, no wrk.

Far less noisy than an HTTP benchmark on a shared 2-core machine, so it is what decides
request-path questions worth a few microseconds (a FastAPI dependency or not, nested routers or
not: docs/benchmarks.md#layout). Compare two trees by pointing --tree at each, in one session:

    python bench/asgi.py --path /encode --tree . --tree /tmp/other-checkout
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


async def measure(path: str, n: int, rounds: int) -> list[float]:
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(bare_endpoint=True, log_level="warning"))
    body = (REPO / "tests" / "data" / "mnist_test_0_digit_7.png").read_bytes()
    headers = [(b"host", b"bench"), (b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())]

    route, _, query = path.partition("?")

    async def call() -> None:
        sent: list[dict] = []
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": route, "raw_path": route.encode(), "query_string": query.encode(),
                 "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        assert sent[0]["status"] == 200, sent

    async with app.router.lifespan_context(app):
        for _ in range(2000):  # warm-up: caches, JIT profiling, the batcher's estimates
            await call()
        results = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(n):
                await call()
            results.append((time.perf_counter() - start) / n * 1e6)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default="/encode", help="/encode, /anomaly-score, /reconstruct or /_bare (a PNG upload), "
                   "with a query if wanted: '/anomaly-score?method=bound'")
    p.add_argument("--n", type=int, default=4000, help="requests per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tree", type=Path, action="append", help="checkout(s) to measure, in turn (default: this one)")
    p.add_argument("--alternations", type=int, default=2, help="with several trees: how many times to go round")
    args = p.parse_args()
    if args.tree:  # each tree in its own process, taking turns, so that drifts of the machine hit all alike
        for _ in range(args.alternations):
            for tree in args.tree:
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--path", args.path, "--n",
                                str(args.n), "--rounds", str(args.rounds)], cwd=tree,
                               env={**os.environ, "PYTHONPATH": str(tree.resolve())}, check=True)
        return 0
    rounds = asyncio.run(measure(args.path, args.n, args.rounds))
    print(f"{REPO.name if Path.cwd() == REPO else Path.cwd()} {args.path}: {min(rounds):.1f} µs/request "
          f"(best of {args.rounds} rounds of {args.n}; all {', '.join(f'{r:.1f}' for r in rounds)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
