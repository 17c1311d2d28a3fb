"""Serving benchmark: the real service under wrk on loopback, against the HTTP ceiling.

Starts `vae-serve` (one worker unless --workers, bundled models, the bare /_bare endpoint
on), drives each endpoint with wrk (bounded: fixed duration, fixed connections) at several
concurrencies, and prints requests/second and p50/p99 latency, each also as a ratio
to the bare upload endpoint measured in the same run. Run it with dynamic batching on
and off (--batching both). Needs `wrk` (Debian: apt-get install wrk). The gRPC rows
(`vae.encode` over the protocol's gRPC service, the same image as the REST rows) are driven
by h2load (Debian: nghttp2-client) with c connections of one stream each, when it is
installed; h2load reports mean latency, not percentiles, so those rows' p50 column is the
mean and their p99 is left out.

    python -m bench.serve [--duration 5] [--concurrency 1 32 128] [--batching both] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGIT = REPO / "tests" / "data" / "mnist_test_0_digit_7.png"
BOUNDARY = "vaebenchboundary"


def lua_script(folder: Path, method: str, body: Path | None, content_type: str | None,
               headers: dict[str, str] | None = None) -> Path:
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines += [f'local f = io.open("{body}", "rb")', "wrk.body = f:read('*all')", "f:close()"]
    if content_type:
        lines.append(f'wrk.headers["Content-Type"] = "{content_type}"')
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items()]
    path = folder / f"{method}-{abs(hash((body, content_type, str(headers))))}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def multipart_body(folder: Path, files: int = 1) -> Path:
    png = DIGIT.read_bytes()
    part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + b"\r\n"
    path = folder / f"multipart-{files}.bin"
    path.write_bytes(part * files + f"--{BOUNDARY}--\r\n".encode())
    return path


def protocol_bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    """One image per request to the Open Inference Protocol's vae.encode, as its clients send it:
    binary tensors with binary outputs (tritonclient's default), JSON in and out, and the PNG file
    as a BYTES tensor. Label -> (body, headers)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(DIGIT).convert("L"))[None]
    png = DIGIT.read_bytes()
    binary = {
        "binary UINT8": ("images_uint8", "UINT8", [1, 28, 28], pixels.tobytes()),
        "binary FP32": ("images", "FP32", [1, 1, 28, 28], (pixels / 255).astype("<f4").tobytes()),
        "BYTES PNG": ("image_files", "BYTES", [1], len(png).to_bytes(4, "little") + png),
    }
    bodies = {}
    for label, (name, datatype, shape, blob) in binary.items():
        header = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                         "parameters": {"binary_data_size": len(blob)}}],
                             "parameters": {"binary_data_output": True}}).encode()
        bodies[label] = (header + blob, {"Content-Type": "application/octet-stream",
                                         "Inference-Header-Content-Length": str(len(header))})
    document = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28],
                            "data": (pixels / 255).astype("float32").reshape(-1).tolist()}]}
    bodies["JSON FP32"] = (json.dumps(document).encode(), {"Content-Type": "application/json"})
    return bodies


def grpc_bodies(folder: Path) -> dict[str, Path]:
    """The same image to the gRPC ModelInfer of vae.encode, as tritonclient.grpc sends it (raw contents),
    each a gRPC frame (uncompressed, 4-byte big-endian length) for h2load to send. Label -> file."""
    import numpy as np
    from PIL import Image

    from app.rpc import inference_pb2 as pb

    pixels = np.asarray(Image.open(DIGIT).convert("L"))[None]
    png = DIGIT.read_bytes()
    inputs = {"binary UINT8": ("images_uint8", "UINT8", [1, 28, 28], pixels.tobytes()),
              "BYTES PNG": ("image_files", "BYTES", [1], len(png).to_bytes(4, "little") + png)}
    files = {}
    for i, (label, (name, datatype, shape, blob)) in enumerate(inputs.items()):
        request = pb.ModelInferRequest(model_name="vae.encode")
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(blob)
        message = request.SerializeToString()
        files[label] = folder / f"grpc-{i}.bin"
        files[label].write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    return files


def check_grpc(address: str, body: Path) -> None:
    """h2load counts HTTP statuses, and a gRPC error is HTTP 200 too: one call first must answer OK."""
    import grpc

    from app.rpc import inference_pb2 as pb

    message = pb.ModelInferRequest.FromString(body.read_bytes()[5:])
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        answer = call(message, timeout=30)
    assert [o.name for o in answer.outputs] == ["mu", "logvar"], answer


def h2load(url: str, body: Path, connections: int, duration: int) -> dict[str, float]:
    cmd = ["h2load", "-D", str(duration), "-c", str(connections), "-m", "1", "-d", str(body),
           "-H", "content-type: application/grpc", "-H", "te: trailers", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    mean, unit = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out).groups()
    failed = re.search(r"requests: .* (\d+) failed, (\d+) errored", out)
    return {"rps": rps, "p50_ms": float(mean) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit], "p99_ms": float("nan"),
            "non2xx": int(failed.group(1)) + int(failed.group(2)), "socket_errors": ""}


def protocol_scripts(folder: Path) -> dict[str, Path]:
    scripts = {}
    for i, (label, (body, headers)) in enumerate(protocol_bodies().items()):
        path = folder / f"oip-{i}.bin"
        path.write_bytes(body)
        headers = dict(headers)
        scripts[label] = lua_script(folder, "POST", path, headers.pop("Content-Type"), headers)
    return scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env_extra: dict[str, str]) -> subprocess.Popen:
    """`vae-serve` on loopback with the bundled models, once /readyz answers 200 (bench/soak.py uses it too)."""
    env = {**os.environ, "VAE_LOG_LEVEL": "warning", "VAE_HOST": "127.0.0.1", "VAE_PORT": str(port), **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli"], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    return wait_ready(proc, f"http://127.0.0.1:{port}/readyz", "server")


@contextmanager
def stopping(proc: subprocess.Popen, timeout_s: float = 60) -> Iterator[subprocess.Popen]:
    """`proc` (a server), sent SIGTERM on leaving however the benchmark ended, and waited for. A server
    started in a session of its own (start_new_session=True) is stopped with every process of it:
    LitServe's workers outlive their parent and would eat the cores of the next measurement."""
    try:
        yield proc
    finally:
        try:
            group = os.getpgid(proc.pid) == proc.pid
        except ProcessLookupError:
            group = False
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout_s)
        if group:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(proc: subprocess.Popen, url: str, what: str, timeout_s: float = 120) -> subprocess.Popen:
    """`proc` once `url` answers 200; killed, and the benchmark stopped, if it does not within `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{what} did not become ready in {timeout_s:g} s")


def parse_wrk(out: str) -> dict[str, float]:
    def ms(value: str, unit: str) -> float:
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": pct["50"], "p99_ms": pct["99"], "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def wrk(url: str, script: Path, connections: int, duration: int) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    cmd = ["wrk", "--latency", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "-s", str(script), url]
    return parse_wrk(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def run(batching: str, duration: int, concurrency: list[int], only: list[str] | None = None,
        workers: int = 1) -> list[dict]:
    grpc_port = free_port()
    env = {"VAE_BARE_ENDPOINT": "true", "VAE_BATCH_MAX_SIZE": "64" if batching == "on" else "1",
           "VAE_WORKERS": str(workers), "VAE_GRPC_PORT": str(grpc_port)}
    port = free_port()
    server = start_server(port, env)
    base = f"http://127.0.0.1:{port}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        png = lua_script(folder, "POST", DIGIT, "image/png")
        targets = {
            "bare upload (ceiling)": (f"{base}/_bare", png),
            "POST /encode (raw PNG)": (f"{base}/encode", png),
            "POST /encode?model=vae-2d": (f"{base}/encode?model=vae-2d", png),
            "POST /encode (multipart)": (f"{base}/encode", lua_script(
                folder, "POST", multipart_body(folder), f"multipart/form-data; boundary={BOUNDARY}")),
            "POST /anomaly-score": (f"{base}/anomaly-score", png),
            "POST /anomaly-score?method=bound": (f"{base}/anomaly-score?method=bound", png),
            "POST /anomaly-score?format=png": (f"{base}/anomaly-score?format=png", png),
            "GET /sample?n=16 (PNG)": (f"{base}/sample?n=16", lua_script(folder, "GET", None, None)),
            "GET /sample?n=16&digit=3 (PNG)": (f"{base}/sample?n=16&digit=3", lua_script(folder, "GET", None, None)),
            "POST /similar?k=8 (JSON)": (f"{base}/similar?k=8", png),
            "POST /interpolate (2 files, PNG)": (f"{base}/interpolate", lua_script(
                folder, "POST", multipart_body(folder, files=2), f"multipart/form-data; boundary={BOUNDARY}")),
            **{f"OIP vae.encode ({label})": (f"{base}/v2/models/vae.encode/infer", script)
               for label, script in protocol_scripts(folder).items()},
        }
        if shutil.which("h2load"):
            targets |= {f"gRPC vae.encode ({label}; mean)": (f"grpc://127.0.0.1:{grpc_port}", body)
                        for label, body in grpc_bodies(folder).items()}
        if only:  # the ceiling always runs: every figure is a ratio to it
            targets = {n: t for i, (n, t) in enumerate(targets.items()) if i == 0 or any(o in n for o in only)}
        with stopping(server):
            for c in concurrency:
                ceiling = None
                for name, (url, script) in targets.items():
                    if url.startswith("grpc://"):
                        address = url.removeprefix("grpc://")
                        check_grpc(address, script)
                        grpc_url = f"http://{address}/inference.GRPCInferenceService/ModelInfer"
                        h2load(grpc_url, script, c, 1)
                        r = h2load(grpc_url, script, c, duration)
                    else:
                        wrk(url, script, c, 1)  # warm the path and the connection pool
                        r = wrk(url, script, c, duration)
                    ceiling = ceiling or r
                    row = {"workers": workers, "batching": batching, "concurrency": c, "endpoint": name, **r,
                           "rps_ratio": r["rps"] / ceiling["rps"], "p50_ratio": r["p50_ms"] / ceiling["p50_ms"]}
                    rows.append(row)
                    print(f"w={workers} {batching:>3} c={c:<4} {name:<32} {r['rps']:>8.0f} req/s "
                          f"({row['rps_ratio']:.2f} of ceiling)  p50 {r['p50_ms']:7.2f} ms "
                          f"({row['p50_ratio']:.2f}x)  p99 {r['p99_ms']:7.2f} ms"
                          f"{'  non-2xx ' + str(r['non2xx']) if r['non2xx'] else ''}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as the table in docs/benchmarks.md."""
    lines = ["| workers | batching | c | endpoint | req/s | ratio to ceiling | p50 ms | p50 ratio | p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['batching']} | {r['concurrency']} | {r['endpoint']} | {r['rps']:.0f} | "
                     f"{r['rps_ratio']:.2f} | {r['p50_ms']:.2f} | {r['p50_ratio']:.2f}x | {r['p99_ms']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--batching", choices=["on", "off", "both"], default="both")
    p.add_argument("--workers", type=int, default=1, help="vae-serve worker processes (VAE_WORKERS); the "
                   "ceiling is measured with the same count")
    p.add_argument("--only", nargs="+", metavar="TEXT", help="only endpoints whose name contains TEXT")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device "
          f"{'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; "
          f"wrk on the same machine; {args.duration} s per figure")
    rows = []
    for mode in (["on", "off"] if args.batching == "both" else [args.batching]):
        rows += run(mode, args.duration, args.concurrency, args.only, args.workers)
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
