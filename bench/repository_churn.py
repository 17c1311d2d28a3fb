"""Models changing under steady load: is any request lost? (docs/operations.md#model-repository)

Starts `vae-serve` on a copy of the bundled models with the folder poll on, drives POST /encode of
`vae` with wrk at a fixed concurrency, and meanwhile, every `--every` seconds, changes the models:
- `other`: unload and load `vae-2d` through the repository API, and replace its file (picked up by
  the poll): the requests to `vae` must all be answered 200;
- `same`: replace `vae`'s own file (an atomic rename, as a deploy does), each new file swapped in by
  the poll while requests flow: they must all be answered 200 too.
Prints requests sent, non-2xx answers and socket errors per scenario, and how many changes were made.

    python -m bench.repository_churn [--duration 20] [--connections 32] [--every 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

from bench.serve import DIGIT, REPO, free_port, lua_script, start_server, stopping


def replace(source: Path, target: Path) -> None:
    """A new file at `target`, as deploys write one: whole, then renamed over the old."""
    part = target.with_name(target.name + ".part")
    shutil.copy(source, part)
    part.replace(target)


def post(url: str) -> int:
    with urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b"{}"), timeout=60) as r:
        return r.status


def churn(scenario: str, base: str, folder: Path, every: float, stop: threading.Event, done: list[str]) -> None:
    while not stop.wait(every):
        if scenario == "other":
            assert post(f"{base}/v2/repository/models/vae-2d/unload") == 200
            assert post(f"{base}/v2/repository/models/vae-2d/load") == 200
            replace(REPO / "models" / "vae-2d.pt", folder / "vae-2d.pt")
            done += ["unload vae-2d", "load vae-2d", "replace vae-2d.pt"]
        else:
            replace(REPO / "models" / "vae.pt", folder / "vae.pt")
            done.append("replace vae.pt")


def run(scenario: str, duration: int, connections: int, every: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        for name in ("vae.pt", "vae-2d.pt"):
            shutil.copy(REPO / "models" / name, folder / name)
        port = free_port()
        server = start_server(port, {"VAE_MODELS_DIR": str(folder), "VAE_MODEL_POLL_S": "0.25",
                                     "VAE_GRPC_PORT": "0"})
        base = f"http://127.0.0.1:{port}"
        with stopping(server):
            script = lua_script(Path(tmp), "POST", DIGIT, "image/png")
            stop, done = threading.Event(), []
            changer = threading.Thread(target=churn, args=(scenario, base, folder, every, stop, done))
            changer.start()
            try:
                out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{duration}s", "-s", str(script),
                                      f"{base}/encode?model=vae"], capture_output=True, text=True, check=True).stdout
            finally:
                stop.set()
                changer.join()
            with urllib.request.urlopen(f"{base}/v2/repository/index", data=b"{}") as r:
                index = json.load(r)
    sent = int(out.split(" requests in ")[0].split()[-1])
    non2xx = int(out.split("Non-2xx or 3xx responses: ")[1].split()[0]) if "Non-2xx" in out else 0
    socket_errors = out.split("Socket errors: ")[1].splitlines()[0] if "Socket errors" in out else "none"
    return {"scenario": scenario, "requests": sent, "non_2xx": non2xx, "socket_errors": socket_errors,
            "changes": len(done), "index": index}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=20, help="seconds of load per scenario")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--every", type=float, default=1.0, help="seconds between changes")
    args = p.parse_args()
    print(f"wrk -c {args.connections} on POST /encode?model=vae for {args.duration} s per scenario; a change every "
          f"{args.every:g} s; the poll looks every 0.25 s")
    print("| models changing | requests to vae | non-2xx | socket errors | changes made |")
    print("| --- | --- | --- | --- | --- |")
    for scenario, label in (("other", "vae-2d unloaded, loaded, replaced"), ("same", "vae.pt itself replaced")):
        r = run(scenario, args.duration, args.connections, args.every)
        print(f"| {label} | {r['requests']} | {r['non_2xx']} | {r['socket_errors']} | {r['changes']} |", flush=True)
        assert all(row["state"] == "READY" for row in r["index"]), r["index"]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
