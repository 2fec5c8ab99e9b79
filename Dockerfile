# Controller image: `cai run | realign | submit` with `--executor kubernetes` and an s3:// store.
# It sequences stages, watches their Jobs and merges shard outputs; stage work runs in images/<stage>.
# Build (repository root as context): make images, or
#   docker build -t ghcr.io/cai-jobs/cai:0.1.0 -f Dockerfile .
FROM python:3.12.12-slim-bookworm

ARG VERSION=0.1.0
# The controller imports no torch or transformers, but the package's core dependencies (accelerate)
# require torch: the CPU wheel avoids the multi-GB nvidia-* CUDA wheels PyPI's Linux torch pulls in.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="cai-jobs controller" \
      org.opencontainers.image.description="Constitutional AI batch jobs: the controller (cai run/realign --executor kubernetes)" \
      org.opencontainers.image.source="https://github.com/cai-jobs/cai-jobs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12.12-slim-bookworm"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# UID/GID 10001: the chart's and the stage Jobs' runAsUser.
RUN groupadd --gid 10001 cai \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin cai

WORKDIR /app
COPY pyproject.toml README.md ./
COPY jobs ./jobs
# Shipped constitutions live beside the package (jobs/constitution.py looks in ../constitutions),
# hence the editable install from /app.
COPY constitutions ./constitutions
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && pip install -e ".[k8s,s3]"

USER 10001:10001
# No HF_HUB_OFFLINE here: the controller downloads Hub models and datasets and imports them into the
# store (HF_TOKEN/HF_ENDPOINT come from the pod, see the chart's `hf` values); stage images stay offline.
ENV HOME=/home/cai \
    TOKENIZERS_PARALLELISM=false \
    CAI_CACHE_DIR=/home/cai/.cache/cai-jobs
ENTRYPOINT ["cai"]
CMD ["--help"]
