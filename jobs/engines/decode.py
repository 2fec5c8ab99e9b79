"""Decoding over a fixed-size K/V cache with one (optionally compiled) step: the transformers engine's GPU path.

transformers' `generate` grows its K/V cache step by step and runs each step's few hundred small kernels
one by one from Python. At batch 128 on a GPU that launch overhead, not the weights, sets the pace. Here
the cache is allocated once (`StaticCache`), so every decode step has the same shapes, and the step can
be compiled with `torch.compile`. On CUDA the mode is "reduce-overhead": the whole step replays as one
CUDA graph. Sampling stays outside the compiled step: it is cheap, and seeds stay exact.

`generate` inside transformers could not be used with a compiled forward on CUDA (its cache and output
handling read graph outputs after the next replay overwrote them). This loop consumes each step's logits
before the next step runs, which is what CUDA graphs need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# Cache lengths are rounded up to a multiple of this, so batches of similar width share one compiled
# graph instead of compiling (and capturing) a new one per width.
LENGTH_BUCKET = 128


def bucket(n: int, step: int = LENGTH_BUCKET) -> int:
    return -(-n // step) * step


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: count real tokens only, so padding never shifts positions."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def stop_lengths(tokens: torch.Tensor, stop_ids: Sequence[int]) -> list[int]:
    """Per row of generated ids [B, n]: tokens through the first stop token (counted), or all n."""
    stops = set(stop_ids)
    return [next((k + 1 for k, t in enumerate(row) if t in stops), len(row)) for row in tokens.tolist()]


def sample_next(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from float logits [B, V]: argmax, or temperature then nucleus sampling."""
    if greedy:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-6)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p (at least one)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Decoded:
    tokens: torch.Tensor  # [B, steps]: generated ids; rows that stopped early are padded after their stop token
    lengths: list[int]  # per row: tokens through its stop token (or all steps)
    # per layer (keys, values) [B, kv_heads, cache_len, head_dim]: the decoder's own cache, valid until its next run
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    cached_len: int  # columns of `layers` that hold K/V: the prompt and every generated token but the last


class StaticDecoder:
    """Greedy or sampled decoding for left-padded batches over a StaticCache.

    `compile`: run the decode step through torch.compile (CUDA graphs on GPU). The first call per batch
    shape pays the compile; later calls of that shape replay it.
    """

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.compiled = compile
        self._cache = None  # reused while batches keep their shape: stable addresses for CUDA graphs
        self._cache_shape: tuple[int, int] | None = None
        self._step = self._forward_step
        if compile:
            mode = "reduce-overhead" if model.device.type == "cuda" else "default"
            self._step = torch.compile(self._forward_step, mode=mode, dynamic=False)

    def _forward_step(self, ids: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, cache_position=cache_position, attention_mask=mask,
                         past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def run(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        pad_id: int,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> Decoded:
        """Decode up to max_new_tokens per row of a left-padded batch (ids, mask: [B, W]).

        `past`: per layer (keys, values) [B, kv_heads, P, head_dim] for the first P columns, which are
        then not prefilled (the transformers engine's prefix reuse); positions follow the mask.
        """
        from transformers import StaticCache

        batch, width = ids.shape
        device = ids.device
        length = bucket(width + max_new_tokens)
        if self._cache_shape == (batch, length):
            cache = self._cache
            cache.reset()
        else:
            self._cache = None  # free the old one before allocating
            cache = self._cache = StaticCache(config=self.model.config, max_cache_len=length)
            self._cache_shape = (batch, length)
        done_cols = 0
        if past is not None:
            done_cols = past[0][0].shape[2]
            written = {"cache_position": torch.arange(done_cols, device=device)}  # older 5.x caches index by it
            for layer, (k, v) in enumerate(past):
                cache.update(k, v, layer, written)
        full_mask = torch.zeros((batch, length), dtype=mask.dtype, device=device)
        full_mask[:, :width] = mask
        positions = positions_from_mask(mask)
        out = self.model(input_ids=ids[:, done_cols:], attention_mask=full_mask, position_ids=positions[:, done_cols:],
                         cache_position=torch.arange(done_cols, width, device=device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        last_pos = positions[:, -1:]
        cache_position = torch.tensor([width], device=device)
        # Asking whether every row has stopped makes the host wait for the GPU; on CUDA ask every 8 steps
        # so the host can queue the next step while the GPU runs this one (rows that stopped emit padding).
        check_every = 8 if device.type == "cuda" else 1
        tokens = []
        for step in range(max_new_tokens):
            nxt = sample_next(logits, greedy, temperature, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            tokens.append(nxt)
            finished |= torch.isin(nxt, stops)
            if step == max_new_tokens - 1 or (step % check_every == check_every - 1 and bool(finished.all())):
                break
            full_mask[:, width + step] = 1
            last_pos = last_pos + 1
            logits = self._step(nxt[:, None], last_pos, cache_position, full_mask, cache)
            cache_position = cache_position + 1
        gen = torch.stack(tokens, dim=1)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return Decoded(tokens=gen, lengths=stop_lengths(gen, stop_ids), layers=layers, cached_len=width + len(tokens) - 1)
