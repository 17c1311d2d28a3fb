"""Per-request cost of one route in-process: the app called directly as ASGI, no sockets, no wrk.

Far less noisy than an HTTP benchmark on a shared 2-core machine, so it is what decides
request-path questions worth a few microseconds (a FastAPI dependency or not, nested routers or
not: docs/benchmarks.md#layout). Compare two trees by pointing --tree at each, in one session:

    python -m bench.asgi --path /encode --tree . --tree /tmp/other-checkout

Several --path values are measured in the same process, round by round in turn; `oip:LABEL`
is the Open Inference Protocol's vae.encode with the body bench/serve.py sends for LABEL
(`oip:binary-UINT8`, `oip:binary-FP32`, `oip:BYTES-PNG`, `oip:JSON-FP32`). `--trace` measures with
tracing on: every request with a `traceparent`, each span exported in batches (the SDK's
BatchSpanProcessor, as OTLP is sent) by the console exporter into /dev/null.
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


def request_for(path: str) -> tuple[str, str, bytes, list[tuple[bytes, bytes]]]:
    """(route, query, body, headers) of one measured request: a PNG upload, or a protocol request."""
    if path.startswith("oip:"):
        from bench.serve import protocol_bodies

        body, headers = protocol_bodies()[path.removeprefix("oip:").replace("-", " ")]
        return ("/v2/models/vae.encode/infer", "", body,
                [(k.lower().encode(), v.encode()) for k, v in headers.items()])
    route, _, query = path.partition("?")
    return route, query, (REPO / "tests" / "data" / "mnist_test_0_digit_7.png").read_bytes(), [
        (b"content-type", b"image/png")]


def trace_to_nowhere() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    from app import tracing

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=open(os.devnull, "w"))))
    tracing._provider, tracing.tracer = provider, provider.get_tracer("bench")


async def measure(paths: list[str], n: int, rounds: int, trace: bool = False, concurrency: int = 1
                  ) -> dict[str, list[float]]:
    from app.main import create_app
    from app.settings import Settings

    if trace:
        trace_to_nowhere()
    traceparent = [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")] if trace else []
    os.environ["VAE_GRPC_PORT"] = "0"  # REST alone is measured (a tree from before gRPC ignores the variable)
    app = create_app(Settings(bare_endpoint=True, log_level="warning"))

    async def call(route: str, query: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        sent: list[dict] = []
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": route, "raw_path": route.encode(), "query_string": query.encode(),
                 "root_path": "", "headers": [(b"host", b"bench"), (b"content-length", str(len(body)).encode()),
                                              *headers, *traceparent],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        assert sent[0]["status"] == 200, sent

    requests = {path: request_for(path) for path in paths}
    async with app.router.lifespan_context(app):
        for request in requests.values():
            for _ in range(2000):  # warm-up: caches, JIT profiling, the batcher's estimates
                await call(*request)
        results: dict[str, list[float]] = {path: [] for path in paths}

        async def client(request: tuple[str, str, bytes, list[tuple[bytes, bytes]]], calls: int) -> None:
            for _ in range(calls):
                await call(*request)

        for _ in range(rounds):
            for path, request in requests.items():
                start = time.perf_counter()
                # `concurrency` clients, each sending its share one after another: batching as under load
                await asyncio.gather(*(client(request, n // concurrency) for _ in range(concurrency)))
                results[path].append((time.perf_counter() - start) / (n // concurrency * concurrency) * 1e6)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", nargs="+", default=["/encode"], help="/encode, /anomaly-score, /reconstruct or /_bare "
                   "(a PNG upload), with a query if wanted: '/anomaly-score?method=bound'; or oip:LABEL")
    p.add_argument("--n", type=int, default=4000, help="requests per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tree", type=Path, action="append", help="checkout(s) to measure, in turn (default: this one)")
    p.add_argument("--alternations", type=int, default=2, help="with several trees: how many times to go round")
    p.add_argument("--trace", action="store_true", help="with tracing on (see above)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (each client sends "
                   "its share in turn): dynamic batching as under load, without sockets")
    args = p.parse_args()
    if args.tree:  # each tree in its own process, taking turns, so that drifts of the machine hit all alike
        for _ in range(args.alternations):
            for tree in args.tree:
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--path", *args.path, "--n",
                                str(args.n), "--rounds", str(args.rounds), "--concurrency", str(args.concurrency),
                                *(["--trace"] if args.trace else [])],
                               cwd=tree,
                               env={**os.environ, "PYTHONPATH": str(tree.resolve())}, check=True)
        return 0
    for path, rounds in asyncio.run(measure(args.path, args.n, args.rounds, args.trace, args.concurrency)).items():
        print(f"{REPO.name if Path.cwd() == REPO else Path.cwd()}{' traced' if args.trace else ''} {path} "
              f"c={args.concurrency}: "
              f"{min(rounds):.1f} µs/request "
              f"(best of {args.rounds} rounds of {args.n}; all {', '.join(f'{r:.1f}' for r in rounds)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
