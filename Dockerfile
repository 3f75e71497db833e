# vqa-serve container image. See docs/deploy.md.
#
#   docker build -t vqa-serve:cuda .                        # GPU hosts (default)
#   docker build -t vqa-serve:cpu --build-arg VARIANT=cpu .  # CPU-only, much smaller
#
# VARIANT=cuda installs torch from PyPI, whose Linux x86_64 wheels bundle the CUDA runtime
# libraries: the host needs only the NVIDIA driver and the NVIDIA Container Toolkit, so no
# nvidia/cuda base image is needed. VARIANT=cpu installs torch/torchvision from PyTorch's
# CPU-only index. TORCH_INDEX_URL overrides the index torch/torchvision come from in either
# variant (e.g. https://download.pytorch.org/whl/cu126 for a specific CUDA build).
#
# Stages: deps (third-party packages, cached until pyproject.toml changes) -> wheel (the
# project itself) -> runtime (deps venv + project wheel + shipped weights, non-root).
# Only classic Dockerfile syntax is used, so the legacy builder and BuildKit both work.

# ---------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS deps

ARG VARIANT=cuda
ARG TORCH_INDEX_URL=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /build
# Only the dependency list: editing the source does not invalidate this (large) layer.
COPY pyproject.toml ./
# 1. requirements.txt: [project].dependencies, verbatim; torch.txt: the torch/torchvision lines.
# 2. For the CPU variant (or an explicit index) install torch/torchvision from that index
#    first, so the PyPI (CUDA) builds are never pulled; pip then sees them as satisfied.
# 3. Everything else from PyPI, within the ranges pyproject.toml pins.
RUN python -m venv /opt/venv \
 && python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('requirements.txt', 'w').write('\n'.join(deps) + '\n'); open('torch.txt', 'w').write('\n'.join(d for d in deps if re.match(r'(torch|torchvision)\b', d)) + '\n')" \
 && case "$VARIANT" in \
      cuda) index="$TORCH_INDEX_URL" ;; \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      *)    echo "VARIANT must be 'cuda' or 'cpu', got '$VARIANT'" >&2; exit 2 ;; \
    esac \
 && if [ -n "$index" ]; then pip install --no-cache-dir --index-url "$index" -r torch.txt; fi \
 && pip install --no-cache-dir -r requirements.txt

# ---------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS wheel

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
COPY models/ models/
COPY training/ training/
COPY bench/ bench/
# The project alone (its dependencies are in the deps stage); build tools stay in this stage.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it (deploy/k8s uses 10001).
# First in this stage, before the ARG: the classic builder looks its cache up by parent image
# and instruction, so a stage opening like deps (FROM + ARG VARIANT=cuda) could be handed
# that stage's cached step, and a rebuild would then miss the dependency layer.
RUN groupadd --system --gid 10001 vqa \
 && useradd --system --uid 10001 --gid vqa --create-home --home-dir /home/vqa --shell /usr/sbin/nologin vqa

ARG VARIANT=cuda
LABEL org.opencontainers.image.title="vqa-serve" \
      org.opencontainers.image.description="Visual Question Answering service (VGG16 + LSTM) with dynamic batching" \
      org.opencontainers.image.licenses="MIT" \
      vqa-serve.variant="$VARIANT"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VQA_HOST=0.0.0.0 \
    VQA_PORT=8000 \
    VQA_WEIGHTS=/app/weights/easy-vqa.safetensors

COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels

WORKDIR /app
# A non-editable install cannot find the repo-relative default, hence VQA_WEIGHTS above.
# Mount a host directory over /app/weights (read-only) to serve other checkpoints.
COPY weights/ /app/weights/

USER 10001:10001
EXPOSE 8000

# Readiness, not liveness: 200 once the model is loaded and warmed up, 503 while draining.
# python, not curl: the slim base has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VQA_PORT', '8000'), timeout=2).status == 200 else 1)"]

# Exec form, no shell: vqa-serve (uvicorn) is PID 1 and receives SIGTERM itself, then
# drains (readiness 503, finish admitted requests) within VQA_SHUTDOWN_TIMEOUT_S.
STOPSIGNAL SIGTERM
CMD ["vqa-serve"]
