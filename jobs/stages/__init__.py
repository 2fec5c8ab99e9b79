"""Stage entry point: `cai stage NAME --spec URI` lands here, in a pod or a local subprocess."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from ..attempts import AttemptStore, Superseded, WorkerView
from ..config import StageSpec
from ..distributed import is_main
from ..errors import ConfigError, StageFailed
from ..manifest import StageManifest, build_manifest, is_complete, manifest_key, now_iso, read_manifest, write_manifest
from ..schema import parse_data
from ..sharding import shard_count, shard_index, shard_output, sum_counts
from ..store import ArtifactStore, split_uri

STAGES = ("generate", "judge", "train", "evaluate")


@dataclass
class StageResult:
    outputs: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB), for the manifest's timings."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def log(stage: str, msg: str) -> None:
    print(f"[{stage}] {msg}", file=sys.stderr, flush=True)


def load_spec(spec_uri: str) -> tuple[StageSpec, ArtifactStore]:
    store, key = split_uri(spec_uri)
    return parse_data(StageSpec, store.read_json(key), spec_uri), store


def shard_spec(spec: StageSpec, index: int, count: int) -> StageSpec:
    """The spec one shard runs: same inputs and params, its own output prefix and manifest."""
    return spec.model_copy(update={"output": shard_output(spec.output, index, count)})


def run_stage(name: str, spec_uri: str, engine=None, shard: int | None = None) -> bool:
    """Run one stage (or, for a sharded spec, one shard) to completion; False when already finished."""
    spec, store = load_spec(spec_uri)
    if spec.stage != name:
        raise ConfigError(f"{spec_uri}: stage: spec is for {spec.stage!r}, not {name!r}; run `cai stage {spec.stage}`")
    if is_complete(store, spec):
        log(name, f"already complete ({store.uri_for(manifest_key(spec))}); skipping")
        return False
    count = shard_count(spec.params)
    module = import_module(f"{__name__}.{name}")
    if count > 1:
        index = shard if shard is not None else shard_index(count)
        part = shard_spec(spec, index, count)
        if is_complete(store, part):
            log(name, f"shard {index + 1}/{count} already complete; skipping")
            return False
        if is_main():
            store.delete(manifest_key(part))
        log(name, f"shard {index + 1}/{count}")
        return _execute(name, part, store, lambda: module.run(part, writer(store, part), engine=engine, shard=(index, count)))
    if is_main():
        store.delete(manifest_key(spec))  # a stale manifest from another spec must not outlive a crash
    return _execute(name, spec, store, lambda: module.run(spec, writer(store, spec), engine=engine))


def writer(store: ArtifactStore, spec: StageSpec) -> AttemptStore | WorkerView:
    """What a stage writes through: this attempt's view of the store; for a torchrun worker (rank > 0) one
    that drops every write, because rank 0 writes the outputs (an engine stage's workers compute the same,
    a train stage's hold their share of the same model)."""
    return AttemptStore(store, spec) if is_main() else WorkerView(store)


def merge_stage(name: str, spec_uri: str) -> bool:
    """Combine a sharded stage's finished shards into the stage's own outputs and manifest."""
    spec, store = load_spec(spec_uri)
    if is_complete(store, spec):
        return False
    count = shard_count(spec.params)
    parts = [shard_spec(spec, i, count) for i in range(count)]
    missing = [i for i, p in enumerate(parts) if not is_complete(store, p)]
    if missing:
        raise StageFailed(f"{store.uri_for(spec.output)}: shards {missing} of {count} have not finished; re-run the stage to resume them")
    manifests: list[StageManifest] = [read_manifest(store, p) for p in parts]  # type: ignore[misc]
    store.delete(manifest_key(spec))
    module = import_module(f"{__name__}.{name}")

    def merged() -> StageResult:
        result: StageResult = module.merge(spec, AttemptStore(store, spec), parts, manifests)
        shard_timings = sum_counts([m.timings for m in manifests])
        shard_timings["peak_rss_mb"] = max(m.timings.get("peak_rss_mb", 0.0) for m in manifests)  # per process, not a sum
        result.timings = {**{f"shards_{k}": v for k, v in shard_timings.items()}, **result.timings, "shards": count}
        return result

    return _execute(name, spec, store, merged)


def _execute(name: str, spec: StageSpec, store: ArtifactStore, work) -> bool:
    started, t0 = now_iso(), time.perf_counter()
    try:
        result: StageResult = work()
    except Superseded as e:  # another attempt published this stage while we worked: its outputs stand
        log(name, str(e))
        return False
    result.timings["total_s"] = time.perf_counter() - t0
    result.timings["peak_rss_mb"] = peak_rss_mb()
    if not is_main():  # a torchrun worker: rank 0 writes the outputs and the manifest
        return True
    write_manifest(store, spec, build_manifest(spec, store, result.outputs, result.counts, result.timings, started))
    log(name, f"done in {result.timings['total_s']:.1f}s (peak memory {result.timings['peak_rss_mb']:.0f} MB) -> {store.uri_for(spec.output)}")
    return True
