"""This service against KServe's own Python model server, on the same model and the same payload.

Both speak the Open Inference Protocol, so one request body measures both: the default model's
encoder (`models/vae.pt`), one MNIST digit per request as a binary UINT8 tensor (tritonclient's
default encoding) and as JSON. `vae-serve` runs with its defaults (one worker, dynamic
batching); KServe runs bench/kserve_encoder.py, the model written as KServe's docs write one
(one worker; its Python server does not batch). Each server is measured in turn, twice over,
wrk on the same machine; the REST `/encode` of the same digit as a PNG is shown for reference.

    python bench/frameworks.py [--duration 5] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve import DIGIT, REPO, free_port, lua_script, protocol_bodies, start_server, stopping, wait_ready, wrk

INFER = "/v2/models/vae.encode/infer"


def start_kserve(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "kserve_encoder.py"), "--http_port", str(port),
                             "--model_path", str(REPO / "models" / "vae.pt"), "--configure_logging", "false"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(proc, f"http://127.0.0.1:{port}/v2/models/vae.encode/ready", "the KServe server")


def scripts(folder: Path) -> dict[str, tuple[str, Path]]:
    """Label -> (path, wrk script). The JSON body sends UINT8 pixels, which both servers take."""
    bodies = protocol_bodies()
    binary, headers = bodies["binary UINT8"]
    header_length = int(headers["Inference-Header-Content-Length"])
    document = json.loads(binary[:header_length])
    document["inputs"][0].pop("parameters")
    document["inputs"][0]["data"] = list(binary[header_length:])
    document.pop("parameters")
    (folder / "binary.bin").write_bytes(binary)
    (folder / "json.json").write_text(json.dumps(document))
    return {
        "OIP binary UINT8": (INFER, lua_script(folder, "POST", folder / "binary.bin", "application/octet-stream",
                                               {"Inference-Header-Content-Length": str(header_length)})),
        "OIP JSON UINT8": (INFER, lua_script(folder, "POST", folder / "json.json", "application/json")),
        "REST /encode raw PNG": ("/encode", lua_script(folder, "POST", DIGIT, "image/png")),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--alternations", type=int, default=2)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    print(f"{os.cpu_count()} CPUs; wrk on the same machine; {args.duration} s per figure; best of "
          f"{args.alternations} alternations")
    best: dict[tuple[str, str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        targets = scripts(Path(tmp))
        for _ in range(args.alternations):
            for server in ("vae-serve", "kserve"):
                port = free_port()
                with stopping(start_server(port, {}) if server == "vae-serve" else start_kserve(port)):
                    for label, (path, script) in targets.items():
                        if server == "kserve" and not path.startswith("/v2"):
                            continue
                        for c in args.concurrency:
                            url = f"http://127.0.0.1:{port}{path}"
                            wrk(url, script, c, 1)
                            r = wrk(url, script, c, args.duration)
                            key = (server, label, c)
                            if key not in best or r["rps"] > best[key]["rps"]:
                                best[key] = r
                            failed = f"  non-2xx {r['non2xx']}" if r["non2xx"] else ""
                            print(f"{server:<9} c={c:<3} {label:<22} {r['rps']:>7.0f} req/s  p50 {r['p50_ms']:6.2f} ms"
                                  f"  p99 {r['p99_ms']:6.2f} ms{failed}", flush=True)
    print("\n| server | payload | c | req/s | p50 ms | p99 ms |\n| --- | --- | --- | --- | --- | --- |")
    for (server, label, c), r in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        print(f"| {server} | {label} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
