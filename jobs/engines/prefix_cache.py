"""Attention keys/values kept from one engine call for the next call that extends the same text.

The generate stage's steps extend each other: a revision request is the critique request plus the
critique, and (without few-shot examples) a critique request is the prompt plus the response. On CPU,
prefill is the expensive part of those long prompts (~600 tok/s for the 135M model on 2 cores, i.e.
~13 s for 32 revision requests of 250 tokens), and it recomputes exactly what the previous call held.

This cache keeps, for every sequence the previous call produced, its token ids and per-layer K/V,
indexed by hashes of 16-token block prefixes (the scheme vLLM's automatic prefix caching uses). A
lookup returns the longest cached prefix of a new prompt, verified token by token, so reuse is exact:
only keys of identical tokens at identical positions are reused.

Lifetime: entries live for one following call (older ones are stale: the next step extends the
newest text), and an entry is released once a batch has taken it, which makes room for the
continuation the batch is about to produce. Insertions beyond the byte budget are skipped, not evicted
in LRU order: the next call's first batches want the oldest entries, so LRU would drop them first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BLOCK = 16  # tokens per hashed block: coarse enough to keep the index small, fine enough to match most of a prefix

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values shaped [kv_heads, tokens, head_dim]


@dataclass
class Entry:
    ids: list[int]
    kv: KV
    call: int
    nbytes: int
    hashes: list[int] = field(default_factory=list)


@dataclass
class CacheStats:
    lookups: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose K/V came from the cache (never prefilled)
    shared_tokens: int = 0  # prompt tokens read once for several rows of a batch (the repeats saved)
    skipped_inserts: int = 0

    @property
    def reuse_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def block_hashes(ids: list[int]) -> list[int]:
    """Hash of each full-block prefix: hashes[b] covers ids[: (b + 1) * BLOCK]."""
    out, h = [], 0
    for b in range(len(ids) // BLOCK):
        h = hash((h, tuple(ids[b * BLOCK : (b + 1) * BLOCK])))
        out.append(h)
    return out


class PrefixCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.entries: dict[int, Entry] = {}
        self.index: dict[int, int] = {}  # block-prefix hash -> entry id (the newest holder)
        self.used = 0
        self.call = 0
        self._next_id = 0
        self.stats = CacheStats()

    def begin_call(self) -> None:
        """Drop entries older than the previous call: no later step extends them."""
        self.call += 1
        for eid in [e for e, entry in self.entries.items() if entry.call < self.call - 1]:
            self.release(eid)

    def lookup(self, ids: list[int]) -> tuple[int | None, int]:
        """(entry id, n): the first n tokens of `ids` are cached; n < len(ids) so one token is left to run."""
        self.stats.lookups += 1
        best: tuple[int | None, int] = (None, 0)
        for b, h in enumerate(block_hashes(ids[:-1])):
            eid = self.index.get(h)
            if eid is None:
                break
            best = (eid, (b + 1) * BLOCK)
        eid, n = best
        if eid is None:
            return None, 0
        cached = self.entries[eid].ids
        if cached[:n] != ids[:n]:  # a hash collision: never reuse keys of different tokens
            return None, 0
        limit = min(len(cached), len(ids) - 1)
        while n < limit and cached[n] == ids[n]:
            n += 1
        return eid, n

    def get(self, eid: int) -> Entry:
        return self.entries[eid]

    def insert(self, ids: list[int], kv: KV) -> bool:
        if len(ids) < BLOCK:
            return False
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if self.used + nbytes > self.capacity:
            self.stats.skipped_inserts += 1
            return False
        eid, self._next_id = self._next_id, self._next_id + 1
        entry = Entry(ids=list(ids), kv=kv, call=self.call, nbytes=nbytes, hashes=block_hashes(ids))
        self.entries[eid] = entry
        self.used += nbytes
        for h in entry.hashes:
            self.index[h] = eid
        return True

    def release(self, eid: int) -> None:
        entry = self.entries.pop(eid, None)
        if entry is None:
            return
        self.used -= entry.nbytes
        for h in entry.hashes:
            if self.index.get(h) == eid:
                del self.index[h]

    def clear(self) -> None:
        for eid in list(self.entries):
            self.release(eid)
