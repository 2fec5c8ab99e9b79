"""One writer's outputs: an attempt of a stage that another attempt already finished stops before it writes.

Two attempts of one stage can overlap: a pod the controller gave up on keeps running while its retry
runs, or two controllers briefly drive one run. Both write the same output keys, and the first to
write `stage.json` wins (create-only). The loser must not then overwrite what the winner published,
or the manifest's hashes would describe bytes that are no longer there. So every write a stage makes
goes through `AttemptStore`, which first looks for a finished manifest of the same spec and, if there
is one, raises `Superseded` instead of writing. What is left, a write that lands in the moment after
the winner's manifest and before the loser looks, is caught by `is_complete`, which checks the
recorded sizes and hashes: the stage then runs once more rather than being read inconsistent.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import StageSpec
from .errors import CaiError
from .manifest import manifest_key, read_manifest
from .store import ArtifactStore


class Superseded(CaiError):
    """Another attempt finished this stage first: this one stops, and its work is not needed."""

    exit_code = 0


class AttemptStore:
    """The store as one attempt of `spec` sees it: reads pass through, writes first check that no other
    attempt has finished the stage."""

    def __init__(self, store: ArtifactStore, spec: StageSpec):
        self._store, self._spec, self._hash = store, spec, spec.spec_hash()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _check(self, key: str) -> None:
        done = read_manifest(self._store, self._spec)
        if done is not None and done.spec_hash == self._hash:
            raise Superseded(f"{self._store.uri_for(key)}: not written: another attempt finished this stage first "
                             f"({self._store.uri_for(manifest_key(self._spec))}, {done.finished_at})")

    def write_bytes(self, key: str, data: bytes) -> None:
        self._check(key)
        self._store.write_bytes(key, data)

    def write_text(self, key: str, text: str) -> None:
        self._check(key)
        self._store.write_text(key, text)

    def write_json(self, key: str, obj: Any) -> None:
        self._check(key)
        self._store.write_json(key, obj)

    def write_jsonl(self, key: str, rows: Iterable[dict]) -> int:
        self._check(key)
        return self._store.write_jsonl(key, rows)

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[Any]:
        with self._store.open_writer(key) as f:
            yield f
            self._check(key)  # the write commits when the block ends: look just before, and discard if superseded

    def put_dir(self, src: Path, key: str, link: bool = False) -> None:
        self._check(key)
        self._store.put_dir(src, key, link=link)


class WorkerView:
    """The store as a torchrun worker (rank > 0) of an engine stage sees it: reads pass through, writes go nowhere.

    Over several pods every process runs the whole stage on the same inputs, because vLLM's external
    launcher needs each of them to make the same engine calls in the same order; all of them then hold
    the same outputs, and rank 0 alone writes them. A stage never reads back what it wrote, so a worker
    that drops its writes computes exactly what rank 0 computes."""

    def __init__(self, store: Any):
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write_bytes(self, key: str, data: bytes) -> None:
        pass

    def write_text(self, key: str, text: str) -> None:
        pass

    def write_json(self, key: str, obj: Any) -> None:
        pass

    def write_jsonl(self, key: str, rows: Iterable[dict]) -> int:
        return sum(1 for _ in rows)

    @contextlib.contextmanager
    def open_writer(self, key: str) -> Iterator[Any]:
        yield _Sink()

    def put_dir(self, src: Path, key: str, link: bool = False) -> None:
        pass

    def delete(self, key: str) -> None:
        pass

    def create_only(self, key: str, data: bytes) -> bool:
        raise RuntimeError(f"{key}: a torchrun worker (rank > 0) never takes part in the store's coordination")

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        return self.create_only(key, data)


class _Sink:
    """A text file that keeps nothing: a worker's copy of the rows rank 0 writes."""

    def write(self, text: str) -> int:
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for _ in lines:
            pass

    def flush(self) -> None:
        pass
