"""Real gRPC clients of the Open Inference Protocol, each run by tests/test_protocol_clients.py in a
process of its own: tritonclient.grpc and KServe each bring their copy of the protocol's proto under
the package name `inference`, and protobuf refuses two definitions of one name in a process.

`python -m tests.grpc_clients triton|kserve HOST:PORT` reads {"pixels": [[[...]]], "pngs": [base64]}
on stdin and prints what the client got, as JSON: answers as lists, failures as (status, message).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

import numpy as np


def triton(address: str, pixels: np.ndarray, pngs: list[bytes]) -> dict[str, Any]:
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    c = g.InferenceServerClient(address)
    out: dict[str, Any] = {"live": c.is_server_live(), "ready": c.is_server_ready(),
                           "model_ready": [c.is_model_ready("vae.encode"), c.is_model_ready("vae.encode", "1")],
                           "server": c.get_server_metadata(as_json=True),
                           "metadata": c.get_model_metadata("vae.encode", as_json=True)}
    images = g.InferInput("images_uint8", list(pixels.shape), "UINT8")
    images.set_data_from_numpy(pixels)
    encoded = c.infer("vae.encode", [images], request_id="t1")
    out["encode"] = {"mu": encoded.as_numpy("mu").tolist(), "logvar": encoded.as_numpy("logvar").tolist(),
                     "id": encoded.get_response().id, "version": encoded.get_response().model_version}
    fp32 = g.InferInput("images", [len(pixels), 1, 28, 28], "FP32")
    fp32.set_data_from_numpy((pixels[:, None] / 255).astype(np.float32))
    out["encode_fp32"] = c.infer("vae.encode", [fp32]).as_numpy("mu").tolist()
    files = g.InferInput("image_files", [len(pngs)], "BYTES")
    files.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    out["encode_files"] = c.infer("vae.encode", [files]).as_numpy("mu").tolist()
    scored = c.infer("vae.anomaly-score", [images], parameters={"seed": 3, "k": 16})
    out["score"] = {n: scored.as_numpy(n).tolist() for n in ("score", "percentile", "is_anomaly")}
    n = g.InferInput("n", [1], "INT32")
    n.set_data_from_numpy(np.array([4], np.int32))
    drawn = c.infer("vae.sample", [n], parameters={"seed": 11})
    out["sample"] = {"z": drawn.as_numpy("z").tolist(), "images": drawn.as_numpy("images").tolist()}
    z = g.InferInput("z", [4, drawn.as_numpy("z").shape[1]], "FP32")
    z.set_data_from_numpy(drawn.as_numpy("z"))
    out["decode"] = c.infer("vae.decode", [z]).as_numpy("images").tolist()
    errors = {}
    for name, call in {
        "unknown_model": lambda: c.infer("nope.encode", [images]),
        "wrong_datatype": lambda: c.infer("vae.encode", [_uint8_as_fp32(g, pixels)]),
        "unknown_version": lambda: c.get_model_metadata("vae.encode", "9"),
        "load_missing": lambda: c.load_model("nothing-here"),
    }.items():
        try:
            call()
            errors[name] = None
        except InferenceServerException as e:
            errors[name] = [e.status(), e.message()]
    out["errors"] = errors
    out["index"] = c.get_model_repository_index(as_json=True).get("models", [])
    c.unload_model("deep-tiny")
    out["after_unload"] = [c.is_model_ready("deep-tiny.encode"),
                           c.get_model_repository_index(as_json=True).get("models", [])]
    c.load_model("deep-tiny")
    out["after_load"] = c.is_model_ready("deep-tiny.encode")
    return out


def _uint8_as_fp32(g: Any, pixels: np.ndarray) -> Any:
    wrong = g.InferInput("images", list(pixels.shape), "UINT8")
    wrong.set_data_from_numpy(pixels)
    return wrong


def kserve(address: str, pixels: np.ndarray, pngs: list[bytes]) -> dict[str, Any]:
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def main() -> dict[str, Any]:
        c = InferenceGRPCClient(address, timeout=60)
        out: dict[str, Any] = {"live": await c.is_server_live(), "ready": await c.is_server_ready(),
                               "model_ready": await c.is_model_ready("vae.encode")}
        for binary in (True, False):  # raw_input_contents, then the typed contents
            images = InferInput("images_uint8", list(pixels.shape), "UINT8")
            images.set_data_from_numpy(pixels, binary_data=binary)
            result = await c.infer(InferRequest(model_name="vae.encode", infer_inputs=[images], request_id="k1"))
            out[f"encode_{'raw' if binary else 'typed'}"] = {
                "id": result.id, **{o.name: o.as_numpy().tolist() for o in result.outputs}}
        scored = await c.infer(InferRequest(model_name="vae.anomaly-score", infer_inputs=[images],
                                            parameters={"seed": 3, "k": 16}))
        out["score"] = {o.name: o.as_numpy().tolist() for o in scored.outputs}
        await c.close()
        return out

    return asyncio.run(main())


if __name__ == "__main__":
    which, address = sys.argv[1], sys.argv[2]
    given = json.load(sys.stdin)
    pixels = np.array(given["pixels"], np.uint8)
    pngs = [base64.b64decode(p) for p in given["pngs"]]
    print(json.dumps({"triton": triton, "kserve": kserve}[which](address, pixels, pngs)))
