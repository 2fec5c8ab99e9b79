"""Text engines behind one interface (`generate`, `score`, `option_logprobs`, `render`)."""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Conversation, Engine, EngineStats, SamplingParams

if TYPE_CHECKING:  # not at run time: the engines import on a machine without pydantic (bench/gpu.py on a GPU box)
    from ..config import EngineConfig


def choose_backend(config: EngineConfig, model_path: str) -> tuple[str, str]:
    """(backend, reason). `auto` takes vLLM when it is installed, runs on the requested device and
    supports the model (see `vllm.unsupported_reason`); otherwise transformers, which runs anything."""
    if config.backend != "auto":
        return config.backend, "engine.backend"
    if importlib.util.find_spec("vllm") is None:
        return "hf", "vllm is not installed"
    from .vllm import unsupported_reason

    why = unsupported_reason(model_path, config.device, config.trust_remote_code)
    return ("hf", why) if why else ("vllm", "vllm is installed and supports the model")


def tensor_parallel_size(setting: int | str, visible: int | None = None) -> int:
    """`auto`: every GPU this process sees (the pod's GPU request), else the number given; 1 without GPUs."""
    if visible is None:
        try:
            import torch

            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            visible = 0
    if setting == "auto":
        return max(1, visible)
    if visible and int(setting) > visible:
        raise ConfigError(f"engine.tensor_parallel: {setting} GPUs asked, {visible} visible; set it to at most {visible} or `auto`")
    return int(setting)


def load_engine(config: EngineConfig, model_path: str) -> Engine:
    """The stage's engine. Under torchrun (a stage over several pods) vLLM spans every process of the launch."""
    from ..distributed import engine_parallel, world_size

    backend, why = choose_backend(config, model_path)
    if config.backend == "auto":
        print(f"[engine] backend auto -> {backend} ({why})", file=sys.stderr, flush=True)
    launched = world_size() > 1
    if launched and backend != "vllm":
        raise ConfigError(f"engine.backend: {backend} ({why}) cannot split a model over {world_size()} processes on several pods; "
                          "use backend: vllm with the vllm extra installed, or one pod (kubernetes.stages.<stage>.nodes: 1)")
    if backend == "vllm":
        from .vllm import VLLMEngine

        tensor, pipeline = engine_parallel() if launched else (tensor_parallel_size(config.tensor_parallel), 1)
        return VLLMEngine(model_path, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code,
                          tensor_parallel=tensor, pipeline_parallel=pipeline, launched=launched)
    from .hf import HFEngine

    return HFEngine(
        model_path,
        dtype=config.dtype,
        device=config.device,
        batch_size=config.batch_size,
        trust_remote_code=config.trust_remote_code,
        prefix_cache_gb=config.prefix_cache_gb,
        decode=config.decode,
    )


__all__ = ["Conversation", "Engine", "EngineStats", "SamplingParams", "choose_backend", "load_engine"]
