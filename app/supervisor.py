"""Several uvicorn workers on one socket, each one restarted alone when it dies.

uvicorn's own supervisor stops every worker, the healthy ones included, as soon as one
replacement fails to start (a models folder that changed on disk under a running service
turns one crash into an outage). This one keeps the others serving, retries the failed
worker with a growing delay (1 s, 2 s, 4 s ... 60 s, in case the folder is fixed), and
gives up only when no worker is left running and the last start of each one failed.

What it tells the world:
- exit status 0 after SIGTERM or SIGINT (forwarded to every worker, which drain as
  app/draining.py says); 3, uvicorn's status for a failed start-up, when no worker can
  start: an orchestrator restarts the pod, and the log says why;
- a status file (VAE_SUPERVISOR_STATUS, set for the workers) that /readyz adds to its
  answer: how many workers are configured, running and ready (each worker says so through
  `mark_ready`), and which are failing to start;
- the Prometheus files of a dead worker are marked dead (prometheus-client's
  multiprocess mode), so that its in-flight gauge no longer counts.

Only uvicorn's public API is used: `Config`, `Config.bind_socket`, `Server.run(sockets)`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE

from app.metrics import multiprocess_dir

log = logging.getLogger("uvicorn.error")
STATUS_ENV = "VAE_SUPERVISOR_STATUS"
MAX_RETRY_S = 60.0
_spawn = multiprocessing.get_context("spawn")  # a fresh interpreter per worker, as uvicorn's own


def serve(config: uvicorn.Config, sockets: list[socket.socket]) -> None:
    """A worker: uvicorn's server on the supervisor's socket; exit 3 if its start-up failed."""
    config.configure_logging()
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)


@dataclass
class Worker:
    index: int
    process: BaseProcess | None = None
    failed_starts: int = 0  # in a row; back to 0 once a start reaches ready
    start_at: float = 0.0  # monotonic time of the next start while no process runs
    last_exit: int | None = None
    ready: bool = False  # its current process has said so (mark_ready)


class Supervisor:
    def __init__(self, config: uvicorn.Config, workers: int, status_file: Path) -> None:
        self.config, self.status_file = config, status_file
        self.workers = [Worker(i) for i in range(workers)]
        self.received: list[int] = []  # SIGTERM / SIGINT, in order: any means stop
        self.forwarded = 0

    def run(self) -> int:
        multiprocessing.allow_connection_pickling()
        sockets = [self.config.bind_socket()]
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        for worker in self.workers:
            self._start(worker, sockets)
        self._write_status()
        while True:
            self._forward_signals()
            running = [w for w in self.workers if w.process is not None]
            if not running and (self.received or all(w.failed_starts for w in self.workers)):
                break
            wait([w.process.sentinel for w in running], timeout=0.5)
            changed = False
            for worker in running:
                assert worker.process is not None
                if worker.process.exitcode is not None:
                    self._ended(worker)
                    changed = True
            for worker in running:
                if worker.process is not None and not worker.ready and self._says_ready(worker.process):
                    worker.ready, worker.failed_starts, changed = True, 0, True
            if not self.received:
                for worker in self.workers:
                    if worker.process is None and time.monotonic() >= worker.start_at:
                        self._start(worker, sockets)
                        changed = True
            if changed:
                self._write_status()
        for s in sockets:
            s.close()
        if not self.received:
            log.error("no worker could start: stopping (exit %d)", STARTUP_FAILURE)
            return STARTUP_FAILURE
        return 0

    def _start(self, worker: Worker, sockets: list[socket.socket]) -> None:
        worker.process = _spawn.Process(target=serve, args=(self.config, sockets), name=f"worker-{worker.index}")
        worker.process.start()
        worker.ready = False

    def _says_ready(self, process: BaseProcess) -> bool:
        return (self.status_file.parent / f"ready-{process.pid}").exists()

    def _ended(self, worker: Worker) -> None:
        process = worker.process
        assert process is not None and process.pid is not None
        process.join()
        worker.process, worker.last_exit, worker.ready = None, process.exitcode, False
        (self.status_file.parent / f"ready-{process.pid}").unlink(missing_ok=True)
        if multiprocess_dir() is not None:
            multiprocess.mark_process_dead(process.pid)
        if self.received:
            return
        if process.exitcode == STARTUP_FAILURE:
            worker.failed_starts += 1
            delay = min(MAX_RETRY_S, 2.0 ** (worker.failed_starts - 1))
            others = sum(w.process is not None for w in self.workers)
            log.error("worker %d [%d] failed to start (exit %d); retrying in %g s, %d other worker(s) serving",
                      worker.index, process.pid, STARTUP_FAILURE, delay, others)
        else:
            worker.failed_starts, delay = 0, 0.0
            log.error("worker %d [%d] died (exit code %s); starting a new one", worker.index, process.pid,
                      process.exitcode)
        worker.start_at = time.monotonic() + delay

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def _forward_signals(self) -> None:
        """Each signal received goes on to every worker, once: the first starts their drain, a second
        ends it at once (app/draining.py)."""
        for signum in self.received[self.forwarded:]:
            self.forwarded += 1
            for worker in self.workers:
                if worker.process is not None and worker.process.pid is not None:
                    os.kill(worker.process.pid, signum)

    def _write_status(self) -> None:
        status = {
            "configured": len(self.workers),
            "running": sum(w.process is not None for w in self.workers),  # started, or starting
            "ready": sum(w.ready for w in self.workers),
            # whose last start failed, while it waits for its next try or tries again
            "failing": [{"worker": w.index, "exit_code": w.last_exit, "failed_starts": w.failed_starts}
                        for w in self.workers if w.failed_starts],
        }
        temporary = self.status_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(status))
        temporary.replace(self.status_file)  # readers never see half a file


def mark_ready() -> None:
    """Called by a worker's app once its models are loaded: the supervisor counts it ready (and a worker
    that failed to start before, as recovered). Nothing to do when not run by this supervisor."""
    path = os.environ.get(STATUS_ENV)
    if path:
        (Path(path).parent / f"ready-{os.getpid()}").touch()


def status() -> dict | None:
    """The supervisor's status file, for /readyz; None when not run by this supervisor."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def shared_file(name: str) -> Path | None:
    """A file every worker of this supervisor can read and write (beside its status file); None when
    not run by this supervisor, where there are no other workers to share with."""
    path = os.environ.get(STATUS_ENV)
    return Path(path).parent / name if path else None
