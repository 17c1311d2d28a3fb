"""The live model repository (app/repository.py): versions, load and unload over REST, the folder poll,
refused files, several workers agreeing, and no request lost while models change under load."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.artifacts import ModelLoadError
from app.inference import Engine
from app.main import create_app
from app.repository import Repository
from tests.test_api import settings
from tests.test_protocol import PIXELS, PNGS

FILE = {"file": ("d.png", PNGS[0], "image/png")}


@pytest.fixture
def folder(tmp_path: Path, trained: Path) -> Path:
    """vae in versions 1 (the 2-D tiny model) and 2 (the 8-D one), and a flat deep-tiny.pt."""
    for version, source in (("1", "vae.pt"), ("2", "deep-tiny.pt")):
        (tmp_path / "vae" / version).mkdir(parents=True)
        shutil.copy(trained / source, tmp_path / "vae" / version / "model.pt")
    shutil.copy(trained / "deep-tiny.pt", tmp_path / "deep-tiny.pt")
    return tmp_path


@pytest.fixture
def client(folder: Path) -> Iterator[TestClient]:
    # the watcher sleeps an hour: each test looks at the folder when it chooses (`poll`)
    with TestClient(create_app(settings(folder, model_poll_s=3600))) as c:
        yield c


def poll(client: TestClient) -> None:
    """One look at the folder, on the app's own event loop."""
    client.portal.call(client.app.state.repository.poll)  # type: ignore[union-attr]


def latent_size(client: TestClient, model: str) -> int:
    answer = client.post("/encode", params={"model": model}, files=FILE)
    assert answer.status_code == 200, answer.text
    return len(answer.json()["mu"])


def infer(client: TestClient, path: str) -> list[int]:
    body = {"inputs": [{"name": "images_uint8", "datatype": "UINT8", "shape": [1, 28, 28],
                        "data": PIXELS[0].reshape(-1).tolist()}]}
    answer = client.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["outputs"][0]["shape"]


def test_every_version_is_served_and_the_newest_by_default(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert (models["vae"]["version"], models["vae"]["versions"], models["vae"]["latent_dim"]) == ("2", ["1", "2"], 8)
    assert models["vae"]["file"] == "model.pt" and models["deep-tiny"]["versions"] == ["1"]
    assert latent_size(client, "vae") == 8
    assert infer(client, "/v2/models/vae.encode/infer") == [1, 8]
    assert infer(client, "/v2/models/vae.encode/versions/1/infer") == [1, 2]
    assert infer(client, "/v2/models/vae.encode/versions/2/infer") == [1, 8]
    assert client.get("/v2/models/vae.encode").json()["versions"] == ["1", "2"]
    assert client.get("/v2/models/vae.encode/versions/3").json() == {
        "error": "unknown model: 'vae.encode' has no version '3'; served: 1, 2"}


def test_load_unload_and_index_over_rest(client: TestClient, folder: Path) -> None:
    assert client.post("/v2/repository/index").json() == [
        {"name": "deep-tiny", "version": "1", "state": "READY", "reason": ""},
        {"name": "vae", "version": "1", "state": "READY", "reason": ""},
        {"name": "vae", "version": "2", "state": "READY", "reason": ""}]
    assert client.post("/v2/repository/models/vae.encode/unload").json() == {"name": "vae", "unload": True}
    assert client.post("/encode", params={"model": "vae"}, files=FILE).status_code == 404
    assert client.get("/v2/models/vae.encode/ready").status_code == 404
    assert client.post("/v2/repository/index", json={"ready": True}).json() == [
        {"name": "deep-tiny", "version": "1", "state": "READY", "reason": ""}]
    assert {"name": "vae", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"} in client.post(
        "/v2/repository/index").json()
    poll(client)
    poll(client)
    assert client.post("/encode", params={"model": "vae"}, files=FILE).status_code == 404  # the poll leaves it be
    assert client.post("/v2/repository/models/vae/load").json() == {"name": "vae", "load": True,
                                                                  "versions": ["1", "2"]}
    assert latent_size(client, "vae") == 8
    assert client.post("/v2/repository/models/nothing/unload").json() == {
        "error": "unknown model: 'nothing'; the repository holds deep-tiny, vae"}
    assert client.post("/v2/repository/models/nothing/load").status_code == 404
    assert client.post("/v2/repository/index", content=b"[1]").status_code == 400


def test_a_bad_file_is_refused_and_the_served_versions_stay(client: TestClient, folder: Path) -> None:
    (folder / "vae" / "3").mkdir()
    (folder / "vae" / "3" / "model.pt").write_bytes(b"not a model")
    answer = client.post("/v2/repository/models/vae/load")
    assert answer.status_code == 400
    assert answer.json()["error"].startswith(f"model file refused: {folder / 'vae' / '3' / 'model.pt'}: not a "
                                             "loadable TorchScript archive")
    row = next(r for r in client.post("/v2/repository/index").json() if r["version"] == "3")
    assert row["state"] == "UNAVAILABLE" and "not a loadable TorchScript archive" in row["reason"]
    assert latent_size(client, "vae") == 8
    assert infer(client, "/v2/models/vae.encode/versions/1/infer") == [1, 2]


def test_the_poll_loads_new_files_swaps_replaced_ones_and_drops_removed_ones(
        client: TestClient, folder: Path, trained: Path, caplog: pytest.LogCaptureFixture) -> None:
    (folder / "vae" / "3").mkdir()
    shutil.copy(trained / "vae.pt", folder / "vae" / "3" / "model.pt")
    poll(client)  # seen once: it may still be being written
    assert latent_size(client, "vae") == 8
    poll(client)  # unchanged since: loaded
    assert latent_size(client, "vae") == 2
    assert client.get("/v2/models/vae.encode").json()["versions"] == ["1", "2", "3"]
    # a replacement that fails its checks: one log line, the version it would replace keeps serving
    (folder / "vae" / "3" / "model.pt").write_bytes(b"half a file")
    poll(client)
    poll(client)
    poll(client)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and str(folder / "vae" / "3" / "model.pt") in refused[0]
    assert latent_size(client, "vae") == 2
    shutil.copy(trained / "deep-tiny.pt", folder / "vae" / "3" / "model.pt")  # fixed: swapped in
    poll(client)
    poll(client)
    assert latent_size(client, "vae") == 8
    assert client.post("/v2/repository/index").json()[-1] == {"name": "vae", "version": "3", "state": "READY",
                                                                "reason": ""}
    shutil.rmtree(folder / "vae" / "3")
    poll(client)
    assert client.get("/v2/models/vae.encode").json()["versions"] == ["1", "2"]


def test_no_request_is_lost_while_models_change_under_load(client: TestClient, folder: Path, trained: Path) -> None:
    """Requests to both models while one is replaced by the poll, unloaded, loaded again: every request
    to the model left alone is answered 200, and so is every one to the changing model while it is served."""
    stop = threading.Event()
    statuses: dict[str, list[int]] = {"deep-tiny": [], "vae": []}

    def send(model: str) -> None:
        while not stop.is_set():
            statuses[model].append(client.post("/encode", params={"model": model}, files=FILE).status_code)

    senders = [threading.Thread(target=send, args=(m,)) for m in ("deep-tiny", "deep-tiny", "vae")]
    for t in senders:
        t.start()
    try:
        for i in range(3):
            source = "vae.pt" if i % 2 == 0 else "deep-tiny.pt"
            shutil.copy(trained / source, folder / "vae" / "2" / "model.pt.tmp")
            (folder / "vae" / "2" / "model.pt.tmp").replace(folder / "vae" / "2" / "model.pt")
            poll(client)
            poll(client)
        vae_before_unload = len(statuses["vae"])
        assert client.post("/v2/repository/models/vae/unload").status_code == 200
        assert client.post("/v2/repository/models/vae/load").status_code == 200
    finally:
        stop.set()
        for t in senders:
            t.join()
    assert statuses["deep-tiny"] and set(statuses["deep-tiny"]) == {200}
    assert vae_before_unload and set(statuses["vae"][:vae_before_unload]) == {200}  # replaced three times
    assert set(statuses["vae"]) <= {200, 404}  # unloaded for a moment: 404, never a failure


def test_an_unload_answers_once_the_calls_in_progress_are_done(trained: Path, tmp_path: Path) -> None:
    shutil.copy(trained / "vae.pt", tmp_path / "vae.pt")

    async def main() -> None:
        repository = Repository(tmp_path, torch.device("cpu"), lambda m: Engine(m, None))
        repository.open("vae")
        engine = repository.engines["vae"]
        engine.batchers()["encode"].busy = True  # a forward pass in progress
        unloading = asyncio.create_task(repository.unload("vae"))
        await asyncio.sleep(0.1)
        assert "vae" not in repository.engines and not unloading.done()  # no new calls; waits for the old one
        engine.batchers()["encode"].busy = False
        await asyncio.wait_for(unloading, 1)
        await repository.close()

    asyncio.run(main())


def test_workers_follow_each_others_loads_and_unloads(trained: Path, tmp_path: Path) -> None:
    """Two workers' repositories over one folder and one shared state file, as vae-serve runs them."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained / "vae.pt", models / "vae.pt")
    shared = tmp_path / "repository.json"

    async def main() -> None:
        a, b = (Repository(models, torch.device("cpu"), lambda m: Engine(m, None), shared=shared) for _ in "ab")
        a.open("vae")
        b.open("vae")
        await a.unload("vae")
        await b.poll()
        assert b.engines == {} and b.index()[0]["reason"] == "unloaded"
        c = Repository(models, torch.device("cpu"), lambda m: Engine(m, None), shared=shared)
        c.open("vae")  # a worker started (or restarted) after the unload keeps it unloaded
        assert c.engines == {}
        await a.load("vae")
        await b.poll()
        await c.poll()
        assert "vae" in b.engines and "vae" in c.engines
        for r in (a, b, c):
            await r.close()

    asyncio.run(main())


def test_start_up_refuses_two_files_for_one_version(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "vae" / "1").mkdir(parents=True)
    shutil.copy(trained / "vae.pt", tmp_path / "vae" / "1" / "model.pt")
    shutil.copy(trained / "vae.pt", tmp_path / "vae.pt")
    (tmp_path / "vae" / "latest").mkdir()  # not a version: left alone
    shutil.copy(trained / "vae.pt", tmp_path / "vae" / "latest" / "model.pt")
    repository = Repository(tmp_path, torch.device("cpu"), lambda m: Engine(m, None))
    clash = r"/vae\.pt: model name 'vae' version 1 already used by .*/vae/1/model\.pt$"
    with pytest.raises(ModelLoadError, match=clash):
        repository.open("vae")
