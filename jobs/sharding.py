"""Sharded stages: shard i of N takes a contiguous slice of the input rows; outputs merge in shard order.

Contiguous slices concatenated in shard order give back the input order, so a merged output does not
depend on N (byte-identical under greedy decoding). The shard index comes from
`JOB_COMPLETION_INDEX`, which Kubernetes sets in each pod of an Indexed Job and the local executor
sets in each child process, so both run the same command.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from .errors import ConfigError
from .store import ArtifactStore

T = TypeVar("T")
INDEX_ENV = "JOB_COMPLETION_INDEX"


def shard_count(params: Mapping[str, Any]) -> int:
    return int(params.get("shards", 1) or 1)


def shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """Rows [lo, hi) of shard `index`: sizes differ by at most one, earlier shards take the extra rows."""
    return index * n // count, (index + 1) * n // count


def shard_output(output: str, index: int, count: int) -> str:
    return f"{output}/shards/{index:05d}-of-{count:05d}"


def shard_index(count: int, env: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(INDEX_ENV)
    if raw is None:
        raise ConfigError(f"{INDEX_ENV}: not set; a stage with shards: {count} runs once per shard with {INDEX_ENV}=0..{count - 1}")
    try:
        index = int(raw)
    except ValueError:
        raise ConfigError(f"{INDEX_ENV}: {raw!r} is not an integer; set it to 0..{count - 1}") from None
    if not 0 <= index < count:
        raise ConfigError(f"{INDEX_ENV}: {index} is out of range for shards: {count}; set it to 0..{count - 1}")
    return index


def take_slice(rows: Iterable[T], lo: int, hi: int) -> Iterator[T]:
    """Rows lo..hi-1 of a stream, without holding the rest."""
    for i, row in enumerate(rows):
        if i >= hi:
            return
        if i >= lo:
            yield row


def chunks(rows: Iterable[T], size: int) -> Iterator[list[T]]:
    """Fixed-size chunks of a stream: 100k prompts never sit in memory at once."""
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def count_rows(store: ArtifactStore, key: str) -> int:
    return sum(1 for _ in store.iter_jsonl(key))


def concat_jsonl(store: ArtifactStore, keys: list[str], dest: str) -> int:
    """Stream the shards' JSONL files into one, in the given order; returns the row count."""
    n = 0
    with store.open_writer(dest) as out:
        for key in keys:
            for line in store.iter_lines(key):
                if line.strip():
                    out.write(line if line.endswith("\n") else line + "\n")
                    n += 1
    return n


def sum_counts(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Add numeric counters key by key (nested dicts too); other values must agree across shards."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
                out.setdefault(k, v)
            elif isinstance(v, dict):
                out[k] = sum_counts([out.get(k, {}), v])
            else:
                out[k] = out.get(k, 0) + v
    return out
