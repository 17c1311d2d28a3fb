"""This service against the frameworks a user would pick instead, on the same model and payload.

- KServe's own Python model server (bench/kserve_encoder.py, one worker; its Python server does
  not batch). Both speak the Open Inference Protocol, so one request body measures both: the
  default model's encoder (`models/vae.pt`), one MNIST digit per request as a binary UINT8 tensor
  (tritonclient's default encoding) and as JSON.
- LitServe (bench/litserve_encoder.py, one inference worker), without batching (its default) and
  with its dynamic batching (up to 64, 1 ms). It takes JSON, so the payload is the PNG in base64,
  which `vae-serve` takes at `/encode` too.
- BentoML (bench/bentoml_encoder.py, one worker), without and with its adaptive batching (up to
  64). Its image parameter takes a multipart upload, the same bytes as `/encode`'s form.
- TorchServe (bench/torchserve_encoder.py, a custom handler, one worker), without and with its
  batching (batchSize 32, maxBatchDelay 5 ms). The body is the PNG itself, as `/encode` takes it.
- Ray Serve (bench/rayserve_encoder.py, one replica), without and with `@serve.batch` (up to 32,
  1 ms). The body is the PNG itself too.

`vae-serve` runs with its defaults (one worker, dynamic batching). Before timing, each server's
answer for the digit is checked against `vae-serve`'s (mu within 1e-5). Each server is measured in
turn, `--alternations` times over, wrk on the same machine; the REST `/encode` of the same digit
as a raw PNG is shown for reference. A framework that is not installed is left out, saying so
(`pip install kserve litserve bentoml torchserve torch-model-archiver "ray[serve]"`; the `bench`
extra names all but KServe, which comes with `dev`; TorchServe also needs Java).

    python -m bench.frameworks [--duration 5] [--concurrency 1 32] [--only vae-serve litserve bentoml]
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from bench.serve import (
    BOUNDARY,
    DIGIT,
    REPO,
    free_port,
    lua_script,
    multipart_body,
    protocol_bodies,
    start_server,
    stopping,
    wait_ready,
    wrk,
)

INFER = "/v2/models/vae.encode/infer"


def start_kserve(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "kserve_encoder.py"), "--http_port", str(port),
                             "--model_path", str(REPO / "models" / "vae.pt"), "--configure_logging", "false"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(proc, f"http://127.0.0.1:{port}/v2/models/vae.encode/ready", "the KServe server")


def start_litserve(port: int, max_batch_size: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "litserve_encoder.py"), "--port", str(port),
                             "--model-path", str(REPO / "models" / "vae.pt"), "--max-batch-size", str(max_batch_size)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return wait_ready(proc, f"http://127.0.0.1:{port}/health", "the LitServe server")


def start_bentoml(port: int, batch: int) -> subprocess.Popen:
    env = {**os.environ, "VAE_BENCH_MODEL": str(REPO / "models" / "vae.pt"), "VAE_BENCH_BATCH": str(batch)}
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "bench.bentoml_encoder:Encoder", "--port",
                             str(port), "--host", "127.0.0.1"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return wait_ready(proc, f"http://127.0.0.1:{port}/readyz", "the BentoML server")


def start_torchserve(port: int, batch: int) -> subprocess.Popen:
    """TorchServe with the encoder archived into a model store of its own, its management and metrics
    APIs on the next free ports, token authorisation off (as a benchmark on loopback needs)."""
    store = Path(tempfile.mkdtemp(prefix="vae-torchserve-"))
    subprocess.run(["torch-model-archiver", "--model-name", "vae", "--version", "1.0", "--serialized-file",
                    str(REPO / "models" / "vae.pt"), "--handler", str(REPO / "bench" / "torchserve_encoder.py"),
                    "--export-path", str(store)], check=True)
    models = {"vae": {"1.0": {"defaultVersion": True, "marName": "vae.mar", "minWorkers": 1, "maxWorkers": 1,
                              "batchSize": batch, "maxBatchDelay": 5, "responseTimeout": 60}}}
    (store / "config.properties").write_text("\n".join([
        f"inference_address=http://127.0.0.1:{port}", f"management_address=http://127.0.0.1:{free_port()}",
        f"metrics_address=http://127.0.0.1:{free_port()}", f"model_store={store}", "load_models=vae.mar",
        f"models={json.dumps(models)}", "disable_token_authorization=true", "enable_metrics_api=false",
        "default_workers_per_model=1", "async_logging=true"]) + "\n")
    env = {**os.environ, "LOG_LOCATION": str(store / "logs"), "METRICS_LOCATION": str(store / "logs")}
    proc = subprocess.Popen(["torchserve", "--start", "--foreground", "--ncs", "--model-store", str(store),
                             "--ts-config", str(store / "config.properties"), "--disable-token-auth"], cwd=store,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return wait_ready(proc, f"http://127.0.0.1:{port}/ping", "the TorchServe server", 180)


def start_rayserve(port: int, batch: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "bench.rayserve_encoder", "--port", str(port), "--model-path",
                             str(REPO / "models" / "vae.pt"), "--max-batch-size", str(batch)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return wait_ready(proc, f"http://127.0.0.1:{port}/-/healthz", "the Ray Serve server", 180)


SERVERS = {  # name -> (module it needs, how to start it on a port, the payloads it takes)
    "vae-serve": (None, lambda port: start_server(port, {}),
                  ("OIP binary UINT8", "OIP JSON UINT8", "JSON base64 PNG", "multipart PNG", "REST /encode raw PNG")),
    "kserve": ("kserve", start_kserve, ("OIP binary UINT8", "OIP JSON UINT8")),
    "litserve": ("litserve", lambda port: start_litserve(port, 1), ("JSON base64 PNG",)),
    "litserve-batch64": ("litserve", lambda port: start_litserve(port, 64), ("JSON base64 PNG",)),
    "bentoml": ("bentoml", lambda port: start_bentoml(port, 1), ("multipart PNG",)),
    "bentoml-batch64": ("bentoml", lambda port: start_bentoml(port, 64), ("multipart PNG",)),
    "torchserve": ("ts", lambda port: start_torchserve(port, 1), ("raw PNG to /predictions/vae",)),
    "torchserve-batch32": ("ts", lambda port: start_torchserve(port, 32), ("raw PNG to /predictions/vae",)),
    "rayserve": ("ray", lambda port: start_rayserve(port, 1), ("raw PNG to /encode",)),
    "rayserve-batch32": ("ray", lambda port: start_rayserve(port, 32), ("raw PNG to /encode",)),
}


def scripts(folder: Path) -> tuple[dict[str, dict[str, tuple[str, Path]]], dict[str, tuple[str, Path, str]]]:
    """The body files, written once into `folder`, and two views of them: server -> payload label ->
    (path, wrk script) for timing, and server -> (path, body file, content type) for `mu_of`.
    The OIP JSON body sends UINT8 pixels, which vae-serve and KServe both take; the PNG in base64
    goes to `/encode`'s JSON form and to LitServe's `/predict`."""
    bodies = protocol_bodies()
    binary, headers = bodies["binary UINT8"]
    header_length = int(headers["Inference-Header-Content-Length"])
    document = json.loads(binary[:header_length])
    document["inputs"][0].pop("parameters")
    document["inputs"][0]["data"] = list(binary[header_length:])
    document.pop("parameters")
    png = base64.b64encode(DIGIT.read_bytes()).decode()
    (folder / "binary.bin").write_bytes(binary)
    (folder / "json.json").write_text(json.dumps(document))
    (folder / "ours.json").write_text(json.dumps({"images": [png]}))
    (folder / "litserve.json").write_text(json.dumps({"image": png}))
    json_type, multipart_type = "application/json", f"multipart/form-data; boundary={BOUNDARY}"
    check = {"kserve": (INFER, folder / "json.json", json_type),
             "vae-serve": ("/encode", folder / "ours.json", json_type),
             "litserve": ("/predict", folder / "litserve.json", json_type),
             "bentoml": ("/encode", multipart_body(folder), multipart_type),
             "torchserve": ("/predictions/vae", DIGIT, "image/png"),
             "rayserve": ("/encode", DIGIT, "image/png")}
    shared = {
        "OIP binary UINT8": (INFER, lua_script(folder, "POST", folder / "binary.bin", "application/octet-stream",
                                               {"Inference-Header-Content-Length": str(header_length)})),
        "OIP JSON UINT8": (INFER, lua_script(folder, "POST", folder / "json.json", json_type)),
        "REST /encode raw PNG": ("/encode", lua_script(folder, "POST", DIGIT, "image/png")),
        "multipart PNG": ("/encode", lua_script(folder, "POST", check["bentoml"][1], multipart_type)),
        "raw PNG to /predictions/vae": ("/predictions/vae", lua_script(folder, "POST", DIGIT, "image/png")),
        "raw PNG to /encode": ("/encode", lua_script(folder, "POST", DIGIT, "image/png")),
    }
    base64_json = {family: (path, lua_script(folder, "POST", body, json_type))
                   for family, (path, body, _) in check.items() if family in ("vae-serve", "litserve")}
    targets = {server: {label: base64_json[family(server)] if label == "JSON base64 PNG" else shared[label]
                        for label in labels} for server, (_, _, labels) in SERVERS.items()}
    return targets, check


def family(server: str) -> str:
    """`litserve-batch64` is LitServe: the same requests, another configuration."""
    return server.removesuffix("-batch64").removesuffix("-batch32")


def mu_of(server: str, port: int, check: dict[str, tuple[str, Path, str]]) -> list[float]:
    """The server's mu for the digit: the same model must give the same answer before it is timed.
    KServe is asked in the protocol's JSON (it answers with binary outputs)."""
    path, body, content_type = check[family(server)]
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", body.read_bytes(), {"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=10) as r:
        raw, header_length = r.read(), r.headers.get("Inference-Header-Content-Length")
    if server != "kserve":
        answer = json.loads(raw)
        return (answer[0] if isinstance(answer, list) else answer)["mu"]  # a batchable BentoML API answers a list
    head = json.loads(raw[: int(header_length)]) if header_length else json.loads(raw)
    offset = int(header_length or 0)
    for out in head["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if out["name"] == "mu":
            return out["data"] if size is None else list(struct.unpack(f"<{size // 4}f", raw[offset: offset + size]))
        offset += size or 0
    raise SystemExit(f"{server}: no mu in its answer")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--alternations", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=list(SERVERS), help="only these servers")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    servers = []
    for server in args.only or SERVERS:
        needs = SERVERS[server][0]
        if needs and importlib.util.find_spec(needs) is None:
            print(f"{server}: left out, `{needs}` is not installed (pip install {needs})")
        else:
            servers.append(server)
    print(f"{os.cpu_count()} CPUs; wrk on the same machine; {args.duration} s per figure; best of "
          f"{args.alternations} alternations")
    best: dict[tuple[str, str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        targets, check = scripts(Path(tmp))
        reference: list[float] | None = None
        for _ in range(args.alternations):
            for server in servers:
                port = free_port()
                with stopping(SERVERS[server][1](port)):
                    mu = mu_of(server, port, check)
                    reference = reference or (mu if server == "vae-serve" else None)
                    if reference and max(abs(a - b) for a, b in zip(mu, reference, strict=True)) > 1e-5:
                        raise SystemExit(f"{server} answers another mu than vae-serve: {mu[:3]}, not {reference[:3]}")
                    for label, (path, script) in targets[server].items():
                        for c in args.concurrency:
                            url = f"http://127.0.0.1:{port}{path}"
                            wrk(url, script, c, 1)
                            r = wrk(url, script, c, args.duration)
                            key = (server, label, c)
                            if key not in best or (r["non2xx"], -r["rps"]) < (best[key]["non2xx"], -best[key]["rps"]):
                                best[key] = r  # the best clean run; a run that shed requests only if all did
                            failed = f"  non-2xx {r['non2xx']}" if r["non2xx"] else ""
                            print(f"{server:<16} c={c:<3} {label:<22} {r['rps']:>7.0f} req/s  p50 "
                                  f"{r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms{failed}", flush=True)
    print("\n| server | payload | c | req/s | p50 ms | p99 ms | non-2xx |\n| --- | --- | --- | --- | --- | --- | --- |")
    for (server, label, c), r in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        print(f"| {server} | {label} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.1f} | {r['non2xx']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
