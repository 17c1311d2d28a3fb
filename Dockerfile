# MNIST VAE service. The same image runs on CPU, and on the GPU under the NVIDIA
# container runtime (PyPI's torch wheel carries CUDA); see docker-compose.gpu.yml.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VAE_MODELS_DIR=/srv/models \
    VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_GRPC_PORT=8081

WORKDIR /srv

# A PyPI mirror, if the build needs one (pip reads these from the environment).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

# Which torch build: empty (the default) takes PyPI's, which carries CUDA (6.1 GB image, the
# same for CPU and GPU hosts); an index of CPU-only wheels, e.g. PyTorch's own
# (--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu), makes a CPU-only image
# of 1.3 GB (README, Docker). The versions are pyproject.toml's either way.
ARG TORCH_INDEX_URL=

# Dependencies first, from pyproject.toml alone: this layer is reused until they change.
COPY pyproject.toml ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        python -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith(('torch==', 'torchvision=='))))" \
            > /tmp/torch.txt \
        && pip install --index-url "$TORCH_INDEX_URL" --requirement /tmp/torch.txt \
        && rm /tmp/torch.txt; \
    fi
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY app ./app
COPY models ./models

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin vae
USER 10001

EXPOSE 8000 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]

# vae-serve = uvicorn with the VAE_* settings; on SIGTERM it reports not ready and keeps answering
# for VAE_DRAIN_DELAY_S, then finishes in-flight requests (VAE_SHUTDOWN_GRACE_S) and exits 0.
CMD ["python", "-m", "app.cli"]
