"""Text engines behind one interface (`generate`, `score`)."""

from __future__ import annotations

from ..config import EngineConfig
from .base import Conversation, Engine, EngineStats, SamplingParams


def load_engine(config: EngineConfig, model_path: str) -> Engine:
    """`auto` and `hf` both use transformers for now; vLLM joins behind the same call."""
    from .hf import HFEngine

    return HFEngine(
        model_path,
        dtype=config.dtype,
        device=config.device,
        batch_size=config.batch_size,
        trust_remote_code=config.trust_remote_code,
        prefix_cache_gb=config.prefix_cache_gb,
    )


__all__ = ["Conversation", "Engine", "EngineStats", "SamplingParams", "load_engine"]
