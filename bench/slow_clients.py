"""Slow and idle clients against `vae-serve` with its default settings (not a test: figures).

1. `/encode` (raw PNG) throughput and p99 under wrk at c=32, alone, then while 400 other
   connections each send the head of a `POST /encode` with `Content-Length: 100000` and then
   trickle the body at one byte per second (the same run, the same server).
2. Resident memory (VmRSS) with no connections, then with 3,000 idle ones open.

    python -m bench.slow_clients [--duration 5] [--slow 400] [--idle 3000]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.serve import DIGIT, free_port, lua_script, start_server, stopping, wrk
from bench.soak import rss_mb


def trickle(port: int, count: int, stop: threading.Event) -> list[socket.socket]:
    """`count` uploads that send one body byte per second until stopped or cut off."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /encode HTTP/1.1\r\nHost: b\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
        socks.append(s)

    def run() -> None:
        while not stop.wait(1.0):
            for s in socks:
                try:
                    s.send(b"x")
                except OSError:
                    pass

    threading.Thread(target=run, daemon=True).start()
    return socks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--slow", type=int, default=400)
    p.add_argument("--idle", type=int, default=3000)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    port = free_port()
    url = f"http://127.0.0.1:{port}/encode"
    with stopping(start_server(port, {})) as proc:
        with tempfile.TemporaryDirectory() as tmp:
            script = lua_script(Path(tmp), "POST", DIGIT, "image/png")
            wrk(url, script, 32, 2)  # warm-up
            alone = wrk(url, script, 32, args.duration)
            stop = threading.Event()
            slow = trickle(port, args.slow, stop)
            time.sleep(1)
            attacked = wrk(url, script, 32, args.duration)
            stop.set()
            for s in slow:
                s.close()
        for label, r in (("alone", alone), (f"during {args.slow} slow uploads", attacked)):
            print(f"/encode c=32 {label:<26} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  non-2xx {r['non2xx']}  {r['socket_errors']}")
        time.sleep(1)
        before = rss_mb(proc.pid)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.idle)]
        time.sleep(2)
        during = rss_mb(proc.pid)
        for s in idle:
            s.close()
        print(f"RSS {before:.1f} MB with no connections, {during:.1f} MB with {args.idle} idle ones "
              f"({(during - before) * 1024 / args.idle:.1f} KB each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
