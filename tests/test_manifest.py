"""Stage manifests are created once: a second writer never overwrites a finished stage."""

from __future__ import annotations

import pytest

from jobs.config import StageSpec
from jobs.errors import StageFailed
from jobs.manifest import build_manifest, is_complete, manifest_key, write_manifest
from jobs.store import LocalStore


def spec(store: LocalStore, seed: int = 0) -> StageSpec:
    store.write_text("runs/r/in.txt", "input")
    return StageSpec(stage="generate", run_id="r", round=1, store=store.uri, output="runs/r/round-1/generate",
                     model="m", inputs={"prompts": "runs/r/in.txt"}, seed=seed)


def test_second_writer_of_the_same_spec_loses_quietly_and_another_spec_fails(tmp_path):
    store = LocalStore(tmp_path)
    s = spec(store)
    store.write_text(f"{s.output}/out.jsonl", "{}\n")
    first = build_manifest(s, store, [f"{s.output}/out.jsonl"], {"n": 1}, {}, "t0")
    assert write_manifest(store, s, first) is True
    assert write_manifest(store, s, build_manifest(s, store, [f"{s.output}/out.jsonl"], {"n": 2}, {}, "t1")) is False
    assert store.read_json(manifest_key(s))["counts"] == {"n": 1}  # the winner's manifest stays
    assert is_complete(store, s)
    other = spec(store, seed=1)
    with pytest.raises(StageFailed, match="different spec"):
        write_manifest(store, other, build_manifest(other, store, [], {}, {}, "t2"))
