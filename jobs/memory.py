"""Will the model fit the GPUs a stage asks for? An estimate from config.json, before anything runs.

A stage that cannot fit fails with one line at plan time instead of with an out-of-memory error an hour
into a run. The estimate is deliberately simple and conservative:

- parameters of a decoder-only transformer from its shapes (embeddings, attention with grouped KV heads,
  a gated MLP or its experts, norms); SmolLM2-135M comes out at 134.5M, Llama-3.1-8B at 8.03B;
- inference (generate, judge, evaluate): the weights in the engine's dtype, spread over the pod's GPUs
  (tensor parallel) and its pods (pipeline parallel), must leave at least a quarter of the memory for
  the KV cache and activations;
- training with DDP: every GPU holds the whole model in mixed precision with Adam: 16 bytes per
  parameter (bf16 weights and gradients, fp32 master weights and two moments), plus 2 bytes for a DPO
  reference model unless its log-probs are precomputed or LoRA serves as the reference; LoRA trains
  only adapters: 2 bytes per frozen parameter;
- training sharded (FSDP full shard, ZeRO-3) over N GPUs: those bytes divided by N, plus what is gathered
  whole in bf16 while it computes (the embeddings and output head, and two decoder layers: the one
  computing and the one prefetched); sharding gradients and
  optimizer state only (FSDP without resharding, ZeRO-2) keeps 2 bytes of bf16 weights per parameter
  on every GPU; offloading to host memory leaves about 4 bytes per parameter / N (bf16 weights and gradients).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

GIB = 1 << 30
INFERENCE_SHARE = 0.75  # of the GPUs' memory the weights may take; the rest is KV cache and activations
TRAIN_SHARE = 0.9  # of one GPU's memory the training state may take; the rest is activations
NODE_GPUS = 8  # GPUs of one common node (HGX/DGX): beyond them a model needs more pods
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}


def parameter_count(cfg: dict[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its config.json (Llama, Qwen2, Mistral, Mixtral ...)."""
    h, layers, vocab = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    heads = int(cfg.get("num_attention_heads", 1))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    inter = int(cfg.get("intermediate_size") or 4 * h)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1)
    attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q and o, k and v
    mlp = 3 * h * inter * experts + (h * experts if experts > 1 else 0)  # gate, up, down (+ the router)
    embeddings = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return layers * (attention + mlp + 2 * h) + embeddings + h


def dtype_bytes(engine_dtype: str, cfg: dict[str, Any]) -> int:
    """Bytes per weight on a GPU: the engine's dtype, or for `auto` the checkpoint's (fp32 checkpoints run in bf16)."""
    if engine_dtype in DTYPE_BYTES:
        return DTYPE_BYTES[engine_dtype]
    return min(DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), 2), 2)


def needed_gib(stage: str, params: int, weight_bytes: int, lora: bool = False, dpo_reference: bool = False,
               shards: int = 1, full_shard: bool = True, offload: bool = False, layers: int = 1,
               embeddings: int = 0) -> tuple[float, str]:
    """(GiB, how it was counted): for inference the weights in all; for training the state per GPU,
    `shards` > 1 when a sharded strategy splits it over that many GPUs (all nodes' processes)."""
    if stage != "train":
        return params * weight_bytes / GIB, f"{params / 1e9:.2f}B parameters x {weight_bytes} bytes"
    per_param = 2 if lora else 16
    ref = 2 if dpo_reference and not lora else 0
    what = "LoRA" if lora else "mixed precision, Adam" + (", DPO reference" if ref else "")
    if shards <= 1 or lora:
        return params * (per_param + ref) / GIB, f"{params / 1e9:.2f}B parameters x {per_param + ref} bytes: {what}"
    sharded = (4 if offload else per_param) + ref
    replicated = 0 if full_shard else 2
    # gathered whole in bf16 while they compute: the root unit (embeddings, output head) and two decoder layers
    gathered = 2 * embeddings + 2 * 2 * (params - embeddings) / max(1, layers)
    gib = (params * (sharded / shards + replicated) + gathered) / GIB
    how = (f"{params / 1e9:.2f}B parameters x {sharded} bytes / {shards} GPUs{' + 2 bytes replicated' if replicated else ''}"
           f" + the embeddings and 2 layers gathered: {what}, sharded{', offloaded' if offload else ''}")
    return gib, how


def check_fits(stage: str, need: float, how: str, gpus: int, gpu_memory_gib: float | None, nodes: int = 1) -> None:
    """Raise a one-line ConfigError when a stage's estimate cannot fit its GPUs (`gpus` per pod; an engine stage
    over `nodes` pods splits the weights over all of them); no GPUs or unknown memory: no check."""
    if not gpus or not gpu_memory_gib:
        return
    if stage == "train":
        room = gpu_memory_gib * TRAIN_SHARE
        if need > room:
            raise ConfigError(f"config: kubernetes.stages.train: about {need:.0f} GiB of training state per GPU ({how}) does not fit "
                              f"{gpu_memory_gib:g} GiB GPUs; use train.distributed.strategy fsdp or deepspeed (shards it over "
                              "the GPUs of every node), train.lora.enabled, train.dpo.precompute_ref_log_probs, or more GPUs or nodes")
        return
    room = nodes * gpus * gpu_memory_gib * INFERENCE_SHARE
    if need > room:
        least = int(-(-need // (gpu_memory_gib * INFERENCE_SHARE)))
        pods = f"{nodes} pods x " if nodes > 1 else ""
        fix = (f"raise kubernetes.stages.{stage}.gpus (tensor parallel) to at least {least}" if stage == "evaluate" or least <= NODE_GPUS and nodes == 1 else
               f"use at least {least} GPUs in all: kubernetes.stages.{stage}.gpus (tensor parallel, up to a node's) times "
               f".nodes (pipeline parallel across pods, engine.backend: vllm), e.g. gpus: {NODE_GPUS}, nodes: {-(-least // NODE_GPUS)}")
        raise ConfigError(f"config: kubernetes.stages.{stage}: about {need:.0f} GiB of weights ({how}) do not fit {pods}{gpus} x "
                          f"{gpu_memory_gib:g} GiB GPUs with room for the KV cache; {fix}")
