"""The curl examples of README.md (one per endpoint) and docs/api.md (all of them) with their real
output, between each page's `examples` markers.

    python scripts/readme_examples.py --write   # run them against a service, put the output in both pages
    python scripts/readme_examples.py --check   # run them, exit 1 if either page says anything else

Needs a service on the bundled models (`make serve`), at localhost:8000 or `--host`; the
commands are shown with localhost:8000 whatever host ran them. Text must match exactly;
numbers within the batching tolerance the README states (1e-5 relative or absolute): a
request's floats can differ in the last digits with the batch it was computed in and the
CPU's vector kernels.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
API_PAGE = REPO / "docs" / "api.md"
START, END = "<!-- examples:start -->", "<!-- examples:end -->"
D = "tests/data"
ENCODE_JSON = ("curl -s -H 'Content-Type: application/json' -d \"{\\\"images\\\": [\\\"$(base64 -w0 "
               f"{D}/mnist_test_2_digit_1.png)\\\"]}}\" 'localhost:8000/encode?model=vae-2d'")
MODELS = ("curl -s localhost:8000/models | python3 -c 'import json,sys; [print(m[\"name\"], m[\"arch\"], \"latent\", "
          "m[\"latent_dim\"], m[\"device\"], m[\"metrics\"]) for m in json.load(sys.stdin)[\"models\"]]'")
EXAMPLES: list[tuple[str, str]] = [
    ("Health, readiness, models:", "curl -s localhost:8000/readyz"),
    ("", MODELS),
    ("Encode one PNG (raw body); the 2-D model keeps the output short:",
     f"curl -s -X POST -H 'Content-Type: image/png' --data-binary @{D}/mnist_test_0_digit_7.png "
     "'localhost:8000/encode?model=vae-2d'"),
    ("A batch as repeated multipart fields, answered in order:",
     f"curl -s -F file=@{D}/mnist_test_0_digit_7.png -F file=@{D}/mnist_test_1_digit_2.png "
     "'localhost:8000/encode?model=vae-2d'"),
    ("JSON with base64 files (or `pixels`: 28x28 arrays in [0, 1]):", ENCODE_JSON),
    ("Decode latents to a PNG grid, or to JSON pixels:",
     "curl -s -H 'Content-Type: application/json' -d '{\"z\": [[0, 0], [1.5, -1]]}' "
     "'localhost:8000/decode?model=vae-2d' -o /tmp/decoded.png "
     "-w '%{http_code} %{content_type} %{size_download} bytes\\n'"),
    ("", "curl -s -H 'Content-Type: application/json' -d '{\"z\": [[0, 0]]}' "
     "'localhost:8000/decode?model=vae-2d&format=json' | head -c 160; echo ..."),
    ("Sample 16 digits as one PNG (the same seed gives the same images; `X-Seed` tells the seed used):",
     "curl -s -H 'X-Request-ID: readme-sample' 'localhost:8000/sample?n=16&seed=7' -o /tmp/samples.png -D - "
     "| grep -i -E '^(HTTP|content-type|x-seed|x-request-id)'"),
    ("Or as JSON with base64 PNGs and the latents used:",
     "curl -s 'localhost:8000/sample?n=1&seed=7&model=vae-2d&format=json&encoding=base64' | head -c 200; echo ..."),
    ("Sample a chosen digit: 8 threes, drawn from the 3s' Gaussian in the latent space:",
     "curl -s 'localhost:8000/sample?digit=3&n=8&seed=1' -o /tmp/threes.png "
     "-w '%{http_code} %{content_type} %{size_download} bytes\\n'"),
    ("Walk from a 7 to a 2: the images decoded along the arc between their codes, as one PNG strip:",
     f"curl -s -F file=@{D}/mnist_test_0_digit_7.png -F file=@{D}/mnist_test_1_digit_2.png "
     "'localhost:8000/interpolate?steps=8' -o /tmp/walk.png "
     "-w '%{http_code} %{content_type} %{size_download} bytes\\n'"),
    ("Or between two latent vectors, as JSON (`path=linear` for the straight line):",
     "curl -s -H 'Content-Type: application/json' -d '{\"z\": [[-2, 0], [2, 0]]}' "
     "'localhost:8000/interpolate?model=vae-2d&steps=3&path=linear&format=json' | head -c 120; echo ..."),
    ("The nearest real digits: the MNIST training digits whose codes lie nearest the image's (`format=png` draws "
     "them):",
     f"curl -s -X POST -H 'Content-Type: image/png' --data-binary @{D}/mnist_test_0_digit_7.png "
     "'localhost:8000/similar?k=3'"),
    ("Reconstruct a photographed dark-on-light digit (inverted, levelled, cropped, fitted; PNG rows of original | "
     "reconstruction):",
     f"curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @{D}/photo_dark_on_light_digit_4.jpg "
     "localhost:8000/reconstruct -o /tmp/recon.png -w '%{http_code} %{content_type} %{size_download} bytes\\n'"),
    ("Anomaly score of an MNIST digit, of the photo, and of noise next to a digit:",
     f"curl -s -X POST -H 'Content-Type: image/png' --data-binary @{D}/mnist_test_0_digit_7.png "
     "localhost:8000/anomaly-score"),
    ("", f"curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @{D}/photo_dark_on_light_digit_4.jpg "
     "'localhost:8000/anomaly-score?k=256'"),
    ("", f"curl -s -F file=@{D}/noise_28x28.png -F file=@{D}/mnist_test_3_digit_0.png "
     "'localhost:8000/anomaly-score?threshold_percentile=99.9'"),
    ("The plain likelihood bound instead of the default score, on a printed question mark (not a digit; the "
     "bound finds it ordinary):",
     f"curl -s -X POST -H 'Content-Type: image/png' --data-binary @{D}/printed_question_mark.png "
     "'localhost:8000/anomaly-score?method=bound'"),
    ("The default score puts it under the p99 threshold (its percentile below): printed, a \"?\" is most of "
     "a 2, and this one passes for a digit. How the score does on whole sets of such shapes: "
     "[the anomaly score](anomaly-score.md).",
     f"curl -s -X POST -H 'Content-Type: image/png' --data-binary @{D}/printed_question_mark.png "
     "localhost:8000/anomaly-score"),
    ("Why: input as seen, reconstruction and per-pixel -log p(x_i|z) for the question mark and a digit, as a PNG:",
     f"curl -s -F file=@{D}/printed_question_mark.png -F file=@{D}/mnist_test_0_digit_7.png "
     "'localhost:8000/anomaly-score?format=png' -o /tmp/why.png -w '%{http_code} %{content_type}\\n'"),
    ("The 2-D model's latent map (the page at `/` draws it): where each MNIST test image's posterior mean lies, "
     "with its digit:",
     "curl -s --compressed localhost:8000/models/vae-2d/latent-map | python3 -c 'import json,sys; m=json.load("
     "sys.stdin); print(m[\"data\"], m[\"n\"], m[\"extent\"]); print(list(zip(m[\"x\"], m[\"y\"], "
     "m[\"label\"]))[:3])'"),
    ("The Open Inference Protocol (below): a protocol model's metadata, then an inference with the PNG as a BYTES "
     "tensor (base64 in JSON):", "curl -s localhost:8000/v2/models/vae-2d.encode"),
    ("", "curl -s -d \"{\\\"inputs\\\": [{\\\"name\\\": \\\"image_files\\\", \\\"datatype\\\": "
     "\\\"BYTES\\\", \\\"shape\\\": [1], \\\"data\\\": [\\\"$(base64 -w0 "
     f"{D}/mnist_test_0_digit_7.png)\\\"]}}]}}\" localhost:8000/v2/models/vae-2d.encode/infer"),
    ("Errors are JSON with a status that says what to fix:",
     "curl -s -w ' %{http_code}\\n' 'localhost:8000/sample?n=100000'"),
    ("", "curl -s -w ' %{http_code}\\n' -H 'Content-Type: application/json' -d '{\"z\": [[0, 0, 0]]}' "
     "'localhost:8000/decode?model=vae-2d'"),
    ("", "curl -s -w ' %{http_code}\\n' -X POST -H 'Content-Type: image/png' --data-binary 'not an image' "
     "localhost:8000/encode"),
]
NUMBER = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?")


# README.md: one example per endpoint, each also in docs/api.md's list above
def example(start: str) -> str:
    """The command of the example whose command starts with `start` (the front page quotes the list)."""
    return next(command for _, command in EXAMPLES if command.startswith(start))


FRONT_PAGE = [
    ("Ready, and with which models:", EXAMPLES[0][1]),
    ("Encode a PNG to its posterior (the 2-D model keeps the output short):", EXAMPLES[2][1]),
    ("Decode latents to a PNG grid:", EXAMPLES[5][1]),
    ("Sample 16 digits (the same seed gives the same images):", EXAMPLES[7][1]),
    ("Sample a chosen digit:", example("curl -s 'localhost:8000/sample?digit=3")),
    ("Walk from one digit to another (a PNG strip of the path between their codes):",
     example(f"curl -s -F file=@{D}/mnist_test_0_digit_7.png -F file=@{D}/mnist_test_1_digit_2.png "
             "'localhost:8000/interpolate")),
    ("The nearest real digits (MNIST training digits) in latent space:",
     example(f"curl -s -X POST -H 'Content-Type: image/png' --data-binary @{D}/mnist_test_0_digit_7.png "
             "'localhost:8000/similar")),
    ("Reconstruct a photographed digit on paper:", example(f"curl -s -X POST -H 'Content-Type: image/jpeg' "
                                                          f"--data-binary @{D}/photo_dark_on_light_digit_4.jpg "
                                                          "localhost:8000/reconstruct")),
    ("Score how unusual an image is (its percentile among held-out MNIST digits, and the flag):",
     example(f"curl -s -X POST -H 'Content-Type: image/png' --data-binary @{D}/mnist_test_0_digit_7.png "
             "localhost:8000/anomaly-score")),
    ("The same through the Open Inference Protocol (a PNG as a BYTES tensor):",
     example("curl -s -d \"{\\\"inputs\\\": [{\\\"name\\\": \\\"image_files\\\"")),
]


def run(host: str, examples: list[tuple[str, str]]) -> str:
    parts = []
    for title, command in examples:
        done = subprocess.run(["bash", "-c", command.replace("localhost:8000", host)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        output = (done.stdout + done.stderr).rstrip("\n").replace("\r", "")
        if title:
            parts.append(title + "\n")
        parts.append(f"```console\n$ {command}\n{output}\n```\n")
    return "\n".join(parts)


PRINTS = re.compile(r"On the bundled models it prints `([^`]*)`")


def tritonclient_line(host: str, write: bool) -> bool:
    """docs/api.md's tritonclient block, run as written against `host`: what it prints must be what the page
    says it prints (with --write, the page is made to say it)."""
    text = API_PAGE.read_text()
    code = re.search(r"<!-- tritonclient:start -->\n```python\n(.*?)```", text, re.S)
    said = PRINTS.search(text)
    if code is None or said is None:
        print("docs/api.md lost its tritonclient block or the line that says what it prints", file=sys.stderr)
        return False
    done = subprocess.run([sys.executable, "-c", code[1].replace('"localhost:8000"', repr(host))], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    printed = done.stdout.strip()
    if write:
        API_PAGE.write_text(text.replace(said[0], f"On the bundled models it prints `{printed}`"))
        return True
    if done.returncode == 0 and same(said[1], printed, 1e-4):
        return True
    print(f"docs/api.md says the tritonclient block prints {said[1]}; it printed {printed} {done.stderr[-500:]}",
          file=sys.stderr)
    return False


def block(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n")


def same(expected: str, got: str, tolerance: float = 1e-5) -> bool:
    """Equal text, and equal numbers within `tolerance` (relative, or absolute near zero)."""
    if NUMBER.sub("#", expected) != NUMBER.sub("#", got):
        return False
    pairs = zip(NUMBER.findall(expected), NUMBER.findall(got), strict=True)
    return all(math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=tolerance) for a, b in pairs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    p.add_argument("--host", default="localhost:8000")
    args = p.parse_args()
    failed = 0 if tritonclient_line(args.host, write=args.write) else 1
    for page, examples in ((README, FRONT_PAGE), (API_PAGE, EXAMPLES)):
        text = page.read_text()
        fresh = run(args.host, examples)
        if args.write:
            page.write_text(text[: text.index(START) + len(START)] + "\n\n" + fresh + "\n" + text[text.index(END):])
            continue
        old = block(text)
        if same(old, fresh.strip("\n")):
            print(f"{page.relative_to(REPO)} examples: as the service answers")
            continue
        for a, b in zip(old.splitlines(), fresh.splitlines(), strict=False):
            if not same(a, b):
                print(f"{page.relative_to(REPO)} says: {a}\nservice says: {b}", file=sys.stderr)
                break
        print(f"{page.relative_to(REPO)}: examples differ from the service's answers: python "
              "scripts/readme_examples.py --write", file=sys.stderr)
        failed = 1
    return failed

if __name__ == "__main__":
    sys.exit(main())
