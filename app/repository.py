"""The live model repository: which artifacts are served, in which versions, and changing that
without a restart (the Open Inference Protocol's repository extension, docs/operations.md).

Layout: flat `models/<file>.pt` (version 1 of the model its meta.json names) and Triton's
`models/<name>/<version>/model.pt`. Every version found is served; a request that names
no version gets the newest. Three things change what is served while requests flow:
- `load(name)`: (re)load every file of that model; all of them must pass the same checks
  as at start-up, else nothing changes and the answer names the file and the fault;
- `unload(name)`: stop routing to the model, then wait for its calls in progress;
- the poll (VAE_MODEL_POLL_S): a new, replaced or removed file, once it has stopped changing
  for one interval, is loaded, swapped in or dropped; a file that fails its checks is
  reported once (one log line, and the repository index's `reason`) while the version it
  would replace keeps serving. A model an operator unloaded stays unloaded until loaded.

Requests are never lost to a change: routing tables are replaced whole (a request holds the
engine it resolved), and a replaced or dropped engine is never closed under its callers: it is
freed with its last one. An unload answers once the model's passes are done.
With several workers (VAE_WORKERS), each keeps its own models: load and unload are written
to a shared state file that the other workers apply within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.artifacts import ArtifactFile, ModelLoadError, ServedModel, artifact_files, load_artifact, load_models
from app.exceptions import ArtifactRefused, UnknownModel
from app.inference import Engine

log = logging.getLogger("app.repository")
READY, UNAVAILABLE = "READY", "UNAVAILABLE"  # the states Triton's repository index reports
SHARED_POLL_S = 1.0  # how often a worker reads the other workers' loads and unloads


@dataclass
class Entry:
    """One file's state: the engine serving it, or why none does."""

    file: ArtifactFile
    name: str | None = None  # known once loaded (a flat file's meta.json says it)
    signature: tuple[int, int, int] | None = None  # of the file its engine was loaded from
    engine: Engine | None = None
    reason: str = ""  # why it is not serving, or why its replacement was refused
    refused: tuple[int, int, int] | None = None  # a file that failed its checks, not to be retried unchanged


@dataclass
class SharedState:
    """What every worker must agree on, in one JSON file: the models unloaded by an operator, and how
    many times each model was loaded by one (a worker reloads when the count passes its own)."""

    path: Path
    unloaded: set[str] = field(default_factory=set)
    loads: dict[str, int] = field(default_factory=dict)
    mtime: int = -1

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> bool:
        """Refresh from the file; True when it changed since the last read."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == self.mtime:
            return False
        data = json.loads(self.path.read_text() or "{}")
        self.unloaded, self.loads, self.mtime = set(data.get("unloaded", [])), dict(data.get("loads", {})), mtime
        return True

    def change(self, name: str, loaded: bool) -> None:
        with self.locked():
            self.read()
            if loaded:
                self.unloaded.discard(name)
                self.loads[name] = self.loads.get(name, 0) + 1
            else:
                self.unloaded.add(name)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"unloaded": sorted(self.unloaded), "loads": self.loads}))
            tmp.replace(self.path)
            self.mtime = self.path.stat().st_mtime_ns


class Repository:
    def __init__(self, folder: Path, device: torch.device, make_engine: Callable[[ServedModel], Engine],
                 poll_s: float = 0.0, drain_s: float = 30.0, shared: Path | None = None) -> None:
        self.folder, self.device, self.make_engine = folder, device, make_engine
        self.poll_s, self.drain_s = poll_s, drain_s
        self.shared = SharedState(shared) if shared is not None else None
        self.entries: dict[Path, Entry] = {}
        self.unloaded: set[str] = set()
        self.loads_seen: dict[str, int] = {}
        # Replaced whole on every change, never mutated: a request reads one consistent table.
        self.engines: dict[str, Engine] = {}  # the newest ready version of each model
        self.versions: dict[str, dict[str, Engine]] = {}
        self._lock = asyncio.Lock()
        self._seen: dict[Path, tuple[int, int, int] | None] = {}  # each file's signature at the last poll
        self._watcher: asyncio.Task[None] | None = None

    # --- start-up and shutdown ---------------------------------------------------------------

    def open(self, default: str) -> None:
        """Load every artifact (start-up: any fault fails the start; app/artifacts.py)."""
        if self.shared is not None:
            self.shared.read()
            self.unloaded = set(self.shared.unloaded)
            self.loads_seen = dict(self.shared.loads)
        models = load_models(self.folder, self.device, default)
        files = {f.path: f for f in artifact_files(self.folder)}
        for by_version in models.values():
            for model in by_version.values():
                file = files[model.path]
                sig = file.signature()
                self.entries[file.path] = Entry(file, model.name, sig, self.make_engine(model))
                self._seen[file.path] = sig
        for name in self.unloaded & set(models):  # another worker's operator unloaded it
            self._drop(name, "unloaded")
        self._publish()

    def start_watching(self) -> None:
        intervals = [*([self.poll_s] if self.poll_s > 0 else []), *([SHARED_POLL_S] if self.shared else [])]
        if intervals:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(min(intervals)))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for entry in self.entries.values():
            if entry.engine is not None:
                entry.engine.close()

    # --- what is served ----------------------------------------------------------------------

    def versions_of(self, name: str) -> list[str]:
        return sorted(self.versions.get(name, {}), key=int)

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every model version the folder holds or held, as the repository extension lists them."""
        rows = []
        for entry in sorted(self.entries.values(), key=lambda e: (e.name or e.file.path.stem, int(e.file.version))):
            state = READY if entry.engine is not None else UNAVAILABLE
            if ready_only and state != READY:
                continue
            rows.append({"name": entry.name or entry.file.path.stem, "version": entry.file.version, "state": state,
                         "reason": entry.reason})
        return rows

    # --- changes -----------------------------------------------------------------------------

    async def load(self, name: str) -> list[str]:
        """(Re)load every file of model `name`, all or nothing; its versions now served."""
        async with self._lock:
            versions = await self._load(name)
        if self.shared is not None:
            self.shared.change(name, loaded=True)
            self.loads_seen[name] = self.shared.loads.get(name, 0)
        return versions

    async def unload(self, name: str) -> None:
        """Stop serving model `name` (every version), then wait for its calls in progress."""
        async with self._lock:
            if not any(e.name == name for e in self.entries.values()):
                raise UnknownModel(f"{name!r}; the repository holds {', '.join(self._names()) or 'no model'}")
            dropped = self._drop(name, "unloaded")
            self.unloaded.add(name)
            self._publish()
        if self.shared is not None:
            self.shared.change(name, loaded=False)
        log.info("model %s unloaded; waiting for %d call(s) in progress", name, sum(e.active for e in dropped))
        await self._drain(dropped)

    async def poll(self) -> None:
        """One look at the shared state and (VAE_MODEL_POLL_S) at the folder; changes as the module says."""
        async with self._lock:
            if self.shared is not None:
                await self._follow_shared()
            if self.poll_s > 0:
                await self._scan()

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll()
            except Exception:  # never let one bad look stop the watching
                log.exception("repository poll failed")

    async def _follow_shared(self) -> None:
        assert self.shared is not None
        if not self.shared.read():
            return
        for name in sorted(self.shared.unloaded - self.unloaded):
            if any(e.name == name for e in self.entries.values()):
                self._drop(name, "unloaded")
                self._publish()
            self.unloaded.add(name)
        for name, count in self.shared.loads.items():
            if count > self.loads_seen.get(name, 0):
                self.loads_seen[name] = count
                try:
                    await self._load(name)
                except (ArtifactRefused, UnknownModel) as e:
                    log.warning("load of %s by another worker refused here: %s", name, e.detail)

    async def _load(self, name: str) -> list[str]:
        files = artifact_files(self.folder)
        known = {path: e.name for path, e in self.entries.items()}
        candidates = [f for f in files if f.name == name or (f.name is None and known.get(f.path) in (name, None))]
        loaded: list[tuple[ArtifactFile, ServedModel, tuple[int, int, int] | None]] = []
        for file in candidates:
            sig = file.signature()
            try:
                model = await asyncio.to_thread(load_artifact, file, self.device)
            except ModelLoadError as e:
                self._refuse(file, sig, str(e))
                if file.name == name or known.get(file.path) == name:
                    raise ArtifactRefused(str(e)) from e
                continue  # a flat file of unknown model that cannot say whose it is: not this load's business
            if model.name == name:
                loaded.append((file, model, sig))
        if not loaded:
            raise UnknownModel(f"{name!r}: no artifact of that name in {self.folder} (flat *.pt files name their "
                               f"model in meta.json; <name>/<version>/model.pt by folder)")
        by_version: dict[str, Path] = {}
        for file, _, _ in loaded:
            if file.version in by_version:
                reason = f"{file.path}: version {file.version} of {name!r} is also {by_version[file.version]}"
                self._refuse(file, file.signature(), reason)
                raise ArtifactRefused(reason)
            by_version[file.version] = file.path
        self._drop(name, "")
        for path in [p for p, e in self.entries.items() if e.name == name and p not in by_version.values()]:
            del self.entries[path]  # its file is gone
        for file, model, sig in loaded:
            self.entries[file.path] = Entry(file, name, sig, self.make_engine(model))
            self._seen[file.path] = sig
        self.unloaded.discard(name)
        self._publish()
        log.info("model %s loaded: version(s) %s", name, ", ".join(sorted(by_version, key=int)))
        return sorted(by_version, key=int)

    async def _scan(self) -> None:
        files = {f.path: f for f in artifact_files(self.folder)}
        for path in [p for p in self.entries if p not in files]:
            entry = self.entries.pop(path)
            self._seen.pop(path, None)
            log.info("model %s version %s: %s is gone; no longer served", entry.name, entry.file.version, path)
            if entry.engine is not None:
                self._publish()
        for path, file in files.items():
            sig, before = file.signature(), self._seen.get(path)
            self._seen[path] = sig
            entry = self.entries.get(path)
            if entry is not None and (entry.name in self.unloaded or sig in (entry.signature, entry.refused)):
                continue
            if sig is None or sig != before:
                continue  # new or still being written: look again next time
            try:
                model = await asyncio.to_thread(load_artifact, file, self.device)
            except ModelLoadError as e:
                self._refuse(file, sig, str(e))
                continue
            if model.name in self.unloaded:
                continue
            clash = next((e for p, e in self.entries.items() if p != path and e.name == model.name
                          and e.file.version == file.version and e.engine is not None), None)
            if clash is not None:
                self._refuse(file, sig, f"{path}: version {file.version} of {model.name!r} is already served from "
                             f"{clash.file.path}")
                continue
            replaced = entry is not None and entry.engine is not None
            self.entries[path] = Entry(file, model.name, sig, self.make_engine(model))
            self._publish()
            log.info("model %s version %s %s from %s", model.name, file.version, "replaced" if replaced else "loaded",
                     path)

    def _refuse(self, file: ArtifactFile, sig: tuple[int, int, int] | None, reason: str) -> None:
        """One line in the log, the reason in the index; whatever served before keeps serving."""
        entry = self.entries.setdefault(file.path, Entry(file))
        entry.refused, entry.reason = sig, reason
        log.warning("model file refused, the served version (if any) stays: %s", reason)

    def _drop(self, name: str, reason: str) -> list[Engine]:
        dropped = []
        for entry in self.entries.values():
            if entry.name == name and entry.engine is not None:
                dropped.append(entry.engine)
                entry.engine, entry.reason = None, reason
        return dropped

    async def _drain(self, engines: list[Engine]) -> None:
        for engine in engines:
            if not await engine.drained(self.drain_s):
                log.warning("model %s: %d call(s) still in progress after %g s", engine.model.name, engine.active,
                            self.drain_s)

    def _publish(self) -> None:
        versions: dict[str, dict[str, Engine]] = {}
        for entry in self.entries.values():
            if entry.engine is not None and entry.name is not None:
                versions.setdefault(entry.name, {})[entry.file.version] = entry.engine
        self.versions = versions
        self.engines = {name: by[max(by, key=int)] for name, by in sorted(versions.items())}

    def _names(self) -> list[str]:
        return sorted({e.name for e in self.entries.values() if e.name})
