"""Stage entry point: `cai stage NAME --spec URI` lands here, in a pod or a local subprocess."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from ..config import StageSpec
from ..errors import ConfigError
from ..manifest import build_manifest, is_complete, manifest_key, now_iso, write_manifest
from ..schema import parse_data
from ..store import ArtifactStore, split_uri

STAGES = ("generate", "judge", "train", "evaluate")


@dataclass
class StageResult:
    outputs: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def log(stage: str, msg: str) -> None:
    print(f"[{stage}] {msg}", file=sys.stderr, flush=True)


def load_spec(spec_uri: str) -> tuple[StageSpec, ArtifactStore]:
    store, key = split_uri(spec_uri)
    return parse_data(StageSpec, store.read_json(key), spec_uri), store


def run_stage(name: str, spec_uri: str, engine=None) -> bool:
    """Run one stage to completion; False when its manifest shows it already finished."""
    spec, store = load_spec(spec_uri)
    if spec.stage != name:
        raise ConfigError(f"{spec_uri}: stage: spec is for {spec.stage!r}, not {name!r}; run `cai stage {spec.stage}`")
    if is_complete(store, spec):
        log(name, f"already complete ({store.uri_for(manifest_key(spec))}); skipping")
        return False
    store.delete(manifest_key(spec))  # a stale manifest from another spec must not outlive a crash
    started, t0 = now_iso(), time.perf_counter()
    module = import_module(f"{__name__}.{name}")
    result: StageResult = module.run(spec, store, engine=engine)
    result.timings["total_s"] = time.perf_counter() - t0
    write_manifest(store, spec, build_manifest(spec, store, result.outputs, result.counts, result.timings, started))
    log(name, f"done in {result.timings['total_s']:.1f}s -> {store.uri_for(spec.output)}")
    return True
