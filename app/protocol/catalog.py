"""What this service offers through the Open Inference Protocol: one protocol model per capability
of each served artifact, named `<model>.<capability>` (`vae.encode`, `vae-2d.anomaly-score`).

The protocol's model is a function from named tensors to named tensors, with one metadata
document saying which; this service's models do six different things, so each becomes six
protocol models, each with exact metadata. Their work is the same Engine's as the REST API's,
so batching, limits, timeouts and overload answers are shared, and so are the query models
(app/queries.py) that check the per-request options, here read from the request's
`parameters`. README "Open Inference Protocol" has the table.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.exceptions import InvalidInput, UnknownModel
from app.imaging import grays_to_tensor
from app.inference import Engine
from app.inputs import ImageReader
from app.protocol.codec import Output, Parameters, Tensor
from app.queries import AnomalyQuery, ImageQuery, SampleQuery, SimilarQuery, parse_parameters
from app.repository import Repository
from app.schemas import Z_LIMIT

PLATFORM = "pytorch_torchscript"
SERVER_NAME = "mnist-vae-service"
EXTENSIONS = ["binary_tensor_data"]  # over REST; gRPC carries binary tensors natively


@dataclass(frozen=True, slots=True)
class Spec:
    """A tensor in a model's metadata; -1 is the batch (or any length)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


IMAGES = Spec("images", "FP32", (-1, 1, 28, 28))
IMAGES_UINT8 = Spec("images_uint8", "UINT8", (-1, 28, 28))
IMAGE_FILES = Spec("image_files", "BYTES", (-1,))
IMAGE_INPUTS = (IMAGES, IMAGES_UINT8, IMAGE_FILES)
ONE_OF_IMAGES = ("exactly one of: images (FP32 [n,1,28,28] in [0, 1]), images_uint8 (UINT8 [n,28,28]) or "
                 "image_files (BYTES [n], encoded image files)")
SAMPLE_INPUTS = (Spec("n", "INT32", (1,)), Spec("seed", "INT64", (1,)), Spec("temperature", "FP32", (1,)),
                 Spec("digit", "INT32", (1,)))

Run = Callable[[Engine, list[Tensor], Parameters, ImageReader], Awaitable[tuple[list[Output], Parameters]]]


@dataclass(frozen=True)
class Capability:
    about: str
    inputs: Callable[[int], tuple[Spec, ...]]  # of the model's latent_dim
    outputs: Callable[[int], tuple[Spec, ...]]
    run: Run


async def read_images(engine: Engine, tensors: list[Tensor], parameters: Parameters, reader: ImageReader
                      ) -> torch.Tensor:
    """The request's one image input as [B,1,28,28]: pixels taken as they are (white digit on black, as
    the REST API's `pixels`), files preprocessed as the REST API does (parameters invert, fit)."""
    expect_only(tensors, [s.name for s in IMAGE_INPUTS])
    if len(tensors) != 1:
        raise InvalidInput(f"give {ONE_OF_IMAGES}; got {len(tensors)} inputs")
    t = tensors[0]
    spec = next(s for s in IMAGE_INPUTS if s.name == t.name)
    if t.datatype != spec.datatype:
        raise InvalidInput(f"input {t.name!r} is {spec.datatype}, not {t.datatype}; give {ONE_OF_IMAGES}")
    batch = t.shape[0] if t.shape else 0
    if batch == 0:
        raise InvalidInput(f"input {t.name!r} holds no images")
    engine.limits.check_batch(batch)
    if spec is IMAGE_FILES:
        if len(t.shape) != 1:
            raise InvalidInput(f"input 'image_files' has shape {list(t.shape)}; it takes [n], one file per element")
        assert t.elements is not None
        prep = parse_parameters(ImageQuery, parameters).preprocess
        return await reader([_file(e, i) for i, e in enumerate(t.elements)], prep)
    assert t.array is not None
    if t.shape[1:] not in ((1, 28, 28), (28, 28)):
        raise InvalidInput(f"input {t.name!r} has shape {list(t.shape)}; it takes [n,1,28,28] or [n,28,28]")
    # In numpy, as decoded files are (imaging.grays_to_tensor says why): UINT8 pixels become
    # exactly the floats a PNG of the same pixels does.
    if spec is IMAGES_UINT8:
        return grays_to_tensor(list(t.array.reshape(batch, 28, 28)))
    if not ((t.array >= 0) & (t.array <= 1)).all():  # NaN fails both
        raise InvalidInput("input 'images' must hold pixels in [0, 1] (white digit on black)")
    return torch.from_numpy(t.array.reshape(batch, 1, 28, 28))


def _file(element: bytes | str, index: int) -> bytes:
    """A BYTES element: the file itself when sent binary, its base64 when sent as a JSON string."""
    if isinstance(element, bytes):
        return element
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"image_files[{index}]: a JSON BYTES element must be the file in base64") from e


def expect_only(tensors: list[Tensor], allowed: list[str]) -> None:
    names = [t.name for t in tensors]
    for name in names:
        if name not in allowed:
            raise InvalidInput(f"unknown input {name!r}; this model takes {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise InvalidInput("an input is given twice")


def _f32(name: str, t: torch.Tensor) -> Output:
    return Output(name, "FP32", t.detach().cpu().numpy())


async def encode(engine: Engine, tensors: list[Tensor], parameters: Parameters, reader: ImageReader
                 ) -> tuple[list[Output], Parameters]:
    mu, logvar = await engine.encode(await read_images(engine, tensors, parameters, reader))
    return [_f32("mu", mu), _f32("logvar", logvar)], {}


async def decode(engine: Engine, tensors: list[Tensor], parameters: Parameters, reader: ImageReader
                 ) -> tuple[list[Output], Parameters]:
    expect_only(tensors, ["z"])
    if len(tensors) != 1 or tensors[0].datatype != "FP32" or tensors[0].array is None:
        raise InvalidInput(f"give one input 'z', FP32 [n,{engine.model.latent_dim}]")
    z = tensors[0].array
    if z.size == 0:
        raise InvalidInput("input 'z' holds no vectors")
    if not bool((np.abs(z) <= Z_LIMIT).all()):  # NaN fails too
        raise InvalidInput(f"input 'z' must hold finite values within ±{Z_LIMIT:g}")
    return [_f32("images", await engine.decode(torch.from_numpy(z)))], {}


async def reconstruct(engine: Engine, tensors: list[Tensor], parameters: Parameters, reader: ImageReader
                      ) -> tuple[list[Output], Parameters]:
    recon = await engine.reconstruct(await read_images(engine, tensors, parameters, reader))
    return [_f32("reconstructions", recon)], {}


async def anomaly_score(engine: Engine, tensors: list[Tensor], parameters: Parameters, reader: ImageReader
                        ) -> tuple[list[Output], Parameters]:
    q = parse_parameters(AnomalyQuery, parameters)
    x = await read_images(engine, tensors, parameters, reader)
    s = await engine.anomaly_scores(x, q.k, q.seed, q.threshold_percentile, q.method)
    outputs = [Output("score", "FP64", np.array([r.score for r in s.results]))]
    if all(r.percentile is not None for r in s.results):  # an uncalibrated method has neither
        outputs.append(Output("percentile", "FP64", np.array([r.percentile for r in s.results])))
        outputs.append(Output("is_anomaly", "BOOL", np.array([bool(r.is_anomaly) for r in s.results])))
    about = {"method": s.method, "k": s.k, "threshold": s.threshold, "threshold_percentile": s.threshold_percentile,
             "calibration_k": s.calibration_k}
    return outputs, {k: v for k, v in about.items() if v is not None}


async def sample(engine: Engine, tensors: list[Tensor], parameters: Parameters, reader: ImageReader
                 ) -> tuple[list[Output], Parameters]:
    """n, seed and temperature from inputs (one element each) or parameters; the inputs win."""
    expect_only(tensors, [s.name for s in SAMPLE_INPUTS])
    values = dict(parameters)
    for t in tensors:
        if t.array is None or t.array.size != 1:
            raise InvalidInput(f"input {t.name!r} must hold one number")
        values[t.name] = t.array.reshape(-1)[0].item()
    q = parse_parameters(SampleQuery, values)
    drawn = await engine.sample(q.n, q.seed, q.temperature, q.digit)
    return [_f32("images", drawn.images), _f32("z", drawn.z), Output("seed", "INT64", np.array([drawn.seed]))], {}


async def similar(engine: Engine, tensors: list[Tensor], parameters: Parameters, reader: ImageReader
                  ) -> tuple[list[Output], Parameters]:
    q = parse_parameters(SimilarQuery, parameters)
    found = await engine.similar(await read_images(engine, tensors, parameters, reader), q.k)
    assert engine.model.index is not None  # similar() refuses a model without one
    rows = found.index.cpu().numpy()
    return [Output("index", "INT64", rows), Output("label", "INT32", engine.model.index.labels[rows].astype(np.int32)),
            _f32("distance", found.distance)], {"k": int(rows.shape[1])}


CAPABILITIES: dict[str, Capability] = {
    "encode": Capability("images -> the posterior's mean and log-variance", lambda d: IMAGE_INPUTS,
                         lambda d: (Spec("mu", "FP32", (-1, d)), Spec("logvar", "FP32", (-1, d))), encode),
    "decode": Capability("latent vectors -> images", lambda d: (Spec("z", "FP32", (-1, d)),),
                         lambda d: (Spec("images", "FP32", (-1, 1, 28, 28)),), decode),
    "sample": Capability("n images from z ~ N(0, T² I), or of one digit from its latent Gaussian; every input "
                         "optional (n=16, a random seed, T=1, any digit)",
                         lambda d: SAMPLE_INPUTS, lambda d: (Spec("images", "FP32", (-1, 1, 28, 28)),
                                                             Spec("z", "FP32", (-1, d)), Spec("seed", "INT64", (1,))),
                         sample),
    "reconstruct": Capability("images -> their reconstructions", lambda d: IMAGE_INPUTS,
                              lambda d: (Spec("reconstructions", "FP32", (-1, 1, 28, 28)),), reconstruct),
    "anomaly-score": Capability("images -> anomaly score, its percentile among held-out MNIST digits, and the "
                                "flag", lambda d: IMAGE_INPUTS,
                                lambda d: (Spec("score", "FP64", (-1,)), Spec("percentile", "FP64", (-1,)),
                                           Spec("is_anomaly", "BOOL", (-1,))), anomaly_score),
    "similar": Capability("images -> the k nearest MNIST training digits in latent space (parameter k, default 8): "
                          "their rows of the training set, digits and distances, nearest first", lambda d: IMAGE_INPUTS,
                          lambda d: (Spec("index", "INT64", (-1, -1)), Spec("label", "INT32", (-1, -1)),
                                     Spec("distance", "FP32", (-1, -1))), similar),
}


def names(engines: dict[str, Engine]) -> list[str]:
    return [f"{model}.{capability}" for model in engines for capability in CAPABILITIES]


def artifact_of(name: str) -> str:
    """The repository's model behind a protocol model name (`vae.encode` -> `vae`); other names as they are."""
    model, _, capability = name.rpartition(".")
    return model if model and capability in CAPABILITIES else name


def resolve(repository: Repository, name: str, version: str | None) -> tuple[Engine, Capability]:
    """The engine (of the version named, else the newest) and capability a protocol model name stands for."""
    model, _, capability = name.rpartition(".")
    if model not in repository.engines or capability not in CAPABILITIES:
        raise UnknownModel(f"{name!r}; served: {', '.join(names(repository.engines))}")
    if version:
        if version not in repository.versions.get(model, {}):
            raise UnknownModel(f"{name!r} has no version {version!r}; served: "
                               f"{', '.join(repository.versions_of(model))}")
        return repository.versions[model][version], CAPABILITIES[capability]
    return repository.engines[model], CAPABILITIES[capability]


def metadata(name: str, engine: Engine, capability: Capability, versions: list[str]) -> dict[str, Any]:
    d = engine.model.latent_dim
    return {"name": name, "versions": versions, "platform": PLATFORM,
            "inputs": [s.metadata() for s in capability.inputs(d)],
            "outputs": [s.metadata() for s in capability.outputs(d)],
            "parameters": {"about": capability.about, "latent_dim": d}}
