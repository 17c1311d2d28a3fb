#!/usr/bin/env bash
# Runs the README's curl examples against a running service (make serve) and prints them with
# their real output as Markdown, for pasting into the README.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vae-examples}
mkdir -p "$OUT"
example() {  # title, command
  [ -n "$1" ] && printf '%s\n\n' "$1"
  printf '```console\n$ %s\n%s\n```\n\n' "$2" "$(bash -c "$2" 2>&1)"
}
D=tests/data
example "Health, readiness, models:" "curl -s localhost:8000/readyz"
example "" "curl -s localhost:8000/models | python3 -c 'import json,sys; [print(m[\"name\"], m[\"arch\"], \"latent\", m[\"latent_dim\"], m[\"device\"], m[\"metrics\"]) for m in json.load(sys.stdin)[\"models\"]]'"
example "Encode one PNG (raw body); the 2-D model keeps the output short:" "curl -s -X POST -H 'Content-Type: image/png' --data-binary @$D/mnist_test_0_digit_7.png 'localhost:8000/encode?model=vae-2d'"
example "A batch as repeated multipart fields, answered in order:" "curl -s -F file=@$D/mnist_test_0_digit_7.png -F file=@$D/mnist_test_1_digit_2.png 'localhost:8000/encode?model=vae-2d'"
example "JSON with base64 files (or \`pixels\`: 28x28 arrays in [0, 1]):" "curl -s -H 'Content-Type: application/json' -d \"{\\\"images\\\": [\\\"\$(base64 -w0 $D/mnist_test_2_digit_1.png)\\\"]}\" 'localhost:8000/encode?model=vae-2d'"
example "Decode latents to a PNG grid, or to JSON pixels:" "curl -s -H 'Content-Type: application/json' -d '{\"z\": [[0, 0], [1.5, -1]]}' 'localhost:8000/decode?model=vae-2d' -o $OUT/decoded.png -w '%{http_code} %{content_type} %{size_download} bytes\n'"
example "" "curl -s -H 'Content-Type: application/json' -d '{\"z\": [[0, 0]]}' 'localhost:8000/decode?model=vae-2d&format=json' | head -c 160; echo ..."
example "Sample 16 digits as one PNG (the same seed gives the same images; \`X-Seed\` tells the seed used):" "curl -s 'localhost:8000/sample?n=16&seed=7' -o $OUT/samples.png -D - | grep -i -E '^(HTTP|content-type|x-seed|x-request-id)'"
example "Or as JSON with base64 PNGs and the latents used:" "curl -s 'localhost:8000/sample?n=1&seed=7&model=vae-2d&format=json&encoding=base64' | head -c 200; echo ..."
example "Reconstruct a photographed dark-on-light digit (inverted, levelled, cropped, fitted; PNG rows of original | reconstruction):" "curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @$D/photo_dark_on_light_digit_4.jpg localhost:8000/reconstruct -o $OUT/recon.png -w '%{http_code} %{content_type} %{size_download} bytes\n'"
example "Anomaly score of an MNIST digit, of the photo, and of noise next to a digit:" "curl -s -X POST -H 'Content-Type: image/png' --data-binary @$D/mnist_test_0_digit_7.png localhost:8000/anomaly-score"
example "" "curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @$D/photo_dark_on_light_digit_4.jpg 'localhost:8000/anomaly-score?k=256'"
example "" "curl -s -F file=@$D/noise_28x28.png -F file=@$D/mnist_test_3_digit_0.png 'localhost:8000/anomaly-score?threshold_percentile=99.9'"
example "Errors are JSON with a status that says what to fix:" "curl -s -w ' %{http_code}\n' 'localhost:8000/sample?n=100000'"
example "" "curl -s -w ' %{http_code}\n' -H 'Content-Type: application/json' -d '{\"z\": [[0, 0, 0]]}' 'localhost:8000/decode?model=vae-2d'"
example "" "curl -s -w ' %{http_code}\n' -X POST -H 'Content-Type: image/png' --data-binary 'not an image' localhost:8000/encode"
