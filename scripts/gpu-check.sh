#!/usr/bin/env bash
# The checks that need a GPU, in one short run (CI has none; docs/benchmarks.md#gpu has what this printed):
#   1. the service answers the same on CUDA as on the CPU (scripts/device_parity.py);
#   2. bench/serve.py on CUDA and on the CPU of the same machine, one after the other;
#   3. training speed on CUDA (bench/train_speed.py);
#   4. the test suite's device-independent files with VAE_DEVICE=auto, i.e. on the GPU.
# Needs the project's dependencies, wrk and the MNIST copy (VAE_TEST_DATA_DIR, default ../shared/data/mnist).
# Logs and JSON go to $OUT (default ./gpu-check-out). Each step has its own time limit, so one hang
# cannot eat the others'; the exit status is the number of steps that failed.
#
#   bash scripts/gpu-check.sh [serve|parity|train|tests ...]   (default: all four)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VAE_TEST_DATA_DIR=${VAE_TEST_DATA_DIR:-../shared/data/mnist}
PY=${PYTHON:-python3}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(parity serve train tests)
failed=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.is_available() and torch.cuda.get_device_name())'

for s in "${steps[@]}"; do
    case $s in
    parity) step parity 180 "$PY" scripts/device_parity.py ;;
    serve)
        # same endpoints and payload as docs/benchmarks.md's table; cuda first, then the CPU baseline
        only=("encode (raw" "anomaly-score" "sample")
        step serve-cuda 150 env VAE_DEVICE=cuda "$PY" bench/serve.py --duration 3 --concurrency 1 32 \
            --batching on --only "${only[@]}" --json "$OUT/serve-cuda.json"
        step serve-cpu 150 env VAE_DEVICE=cpu "$PY" bench/serve.py --duration 3 --concurrency 1 32 \
            --batching on --only "${only[@]}" --json "$OUT/serve-cpu.json" ;;
    train) step train 120 "$PY" bench/train_speed.py --data-dir "$VAE_TEST_DATA_DIR" --epochs 2 --device cuda ;;
    tests)
        # every test file whose tools are installed on a bare GPU image: the browser, schema fuzzing,
        # generated clients, Triton/KServe clients, Kubernetes schemas and the OOD suite's Debian fonts
        # (tests/test_ood.py) are left to CI
        step tests 240 "$PY" -m pytest -q -p no:cacheprovider -rfE --timeout 120 \
            tests/test_anomaly.py tests/test_api.py tests/test_artifact.py tests/test_batching.py \
            tests/test_cli.py tests/test_concurrency.py tests/test_data.py tests/test_distributed.py \
            tests/test_fitted_score.py tests/test_inputs.py tests/test_latent_map.py tests/test_limits.py \
            tests/test_metrics.py tests/test_preprocessing.py tests/test_protocol.py \
            tests/test_slow_clients.py tests/test_training.py ;;
    *) echo "unknown step $s"; failed=$((failed + 1)) ;;
    esac
done
echo "gpu-check: $failed step(s) failed"
exit "$failed"
