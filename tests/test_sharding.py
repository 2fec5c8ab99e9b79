"""Sharded stages: slices cover the input once, merged outputs do not depend on the shard count,
shards resume independently, and the local executor runs them as parallel processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.config import EvaluateConfig, GenerateConfig, JudgeConfig, StageSpec
from jobs.errors import ConfigError, StageFailed
from jobs.executors import LocalExecutor
from jobs.manifest import is_complete, manifest_key
from jobs.sharding import shard_bounds, shard_index, sum_counts, take_slice
from jobs.stages import merge_stage, run_stage, shard_spec
from jobs.store import LocalStore

from test_generate_stage import plan_generate

CONSTITUTION_KEY = "runs/t/inputs/constitution.yaml"


@pytest.mark.parametrize("n", [0, 1, 5, 7, 100])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_bounds_cover_every_row_once_and_balance(n, count):
    bounds = [shard_bounds(n, i, count) for i in range(count)]
    rows = [r for lo, hi in bounds for r in range(lo, hi)]
    assert rows == list(range(n))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_take_slice_streams_without_reading_past_the_end():
    consumed = []

    def rows():
        for i in range(10**9):
            consumed.append(i)
            yield i

    assert list(take_slice(rows(), 3, 6)) == [3, 4, 5]
    assert consumed[-1] == 6  # stopped one row past the slice, not at the end of the stream


def test_shard_index_comes_from_the_indexed_job_variable():
    assert shard_index(4, {"JOB_COMPLETION_INDEX": "3"}) == 3
    for env in ({}, {"JOB_COMPLETION_INDEX": "x"}, {"JOB_COMPLETION_INDEX": "4"}):
        with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX"):
            shard_index(4, env)


def test_sum_counts_adds_nested_counters_and_keeps_labels():
    merged = sum_counts([{"a": 1, "p": {"x": 2}, "model": "m"}, {"a": 2, "p": {"x": 1, "y": 1}, "model": "m"}])
    assert merged == {"a": 3, "p": {"x": 3, "y": 1}, "model": "m"}


def test_shard_count_is_not_part_of_the_spec_hash():
    one = StageSpec(stage="generate", run_id="r", round=1, store="/s", output="o", model="m", params={"shards": 1, "x": 1})
    four = one.model_copy(update={"params": {"shards": 4, "x": 1}})
    assert one.spec_hash() == four.spec_hash()
    assert one.spec_hash() != one.model_copy(update={"params": {"shards": 1, "x": 2}}).spec_hash()


def run_sharded(store: LocalStore, spec: StageSpec, engine, shards: int, output: str) -> Path:
    spec = spec.model_copy(update={"output": output, "params": {**spec.params, "shards": shards}})
    store.write_json(spec.spec_key, spec.model_dump(mode="json"))
    uri = store.uri_for(spec.spec_key)
    if shards == 1:
        assert run_stage(spec.stage, uri, engine=engine)
    else:
        for i in reversed(range(shards)):  # any order: merged in shard order
            assert run_stage(spec.stage, uri, engine=engine, shard=i)
        assert merge_stage(spec.stage, uri)
    assert is_complete(store, spec)
    return Path(store.root) / output


def test_generate_merged_outputs_are_byte_identical_for_1_2_4_shards(tmp_path, tiny_run_config, tiny_engine):
    store, spec = plan_generate(tiny_run_config, tmp_path / "store")
    outs = [run_sharded(store, spec, tiny_engine, n, f"runs/x/gen-{n}") for n in (1, 2, 4)]
    for name in ("sft.jsonl", "traces.jsonl"):
        blobs = {(out / name).read_bytes() for out in outs}
        assert len(blobs) == 1, name
    manifests = [json.loads((out / "stage.json").read_text()) for out in outs]
    assert {m["counts"]["prompts"] for m in manifests} == {6}
    assert {m["counts"]["revisions"] for m in manifests} == {12}
    assert {m["counts"]["revision_rounds"] for m in manifests} == {2}
    assert manifests[2]["timings"]["shards"] == 4 and manifests[2]["timings"]["shards_peak_rss_mb"] > 0
    assert manifests[0]["timings"]["peak_rss_mb"] > 0


def test_judge_and_evaluate_merge_like_unsharded(tmp_path, tiny_run_config, tiny_engine, tiny_model_dir):
    store, gen = plan_generate(tiny_run_config, tmp_path / "store")
    assert run_stage("generate", store.uri_for(gen.spec_key), engine=tiny_engine)
    judge = StageSpec(stage="judge", run_id=gen.run_id, round=1, store=store.uri, output="j", model=str(tiny_model_dir),
                      inputs={"constitution": gen.inputs["constitution"], "traces": f"{gen.output}/traces.jsonl"},
                      params=JudgeConfig(min_margin=0.0).model_dump(mode="json"))
    a, b = (run_sharded(store, judge, tiny_engine, n, f"runs/x/judge-{n}") for n in (1, 3))
    assert (a / "prefs.jsonl").read_bytes() == (b / "prefs.jsonl").read_bytes()
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())

    ev = StageSpec(stage="evaluate", run_id=gen.run_id, round=0, store=store.uri, output="e", model=str(tiny_model_dir),
                   inputs={"constitution": gen.inputs["constitution"]}, params=EvaluateConfig(limit=3).model_dump(mode="json"))
    a, b = (run_sharded(store, ev, tiny_engine, n, f"runs/x/eval-{n}") for n in (1, 2))
    assert (a / "samples.jsonl").read_bytes() == (b / "samples.jsonl").read_bytes()
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["variants"] == rb["variants"] and ra["sets"] == rb["sets"]


def test_merge_refuses_missing_shards_and_finished_shards_are_skipped(tmp_path, tiny_run_config, tiny_engine):
    store, spec = plan_generate(tiny_run_config, tmp_path / "store", generate__shards=3)
    uri = store.uri_for(spec.spec_key)
    assert run_stage("generate", uri, engine=tiny_engine, shard=1)
    with pytest.raises(StageFailed, match=r"shards \[0, 2\] of 3"):
        merge_stage("generate", uri)
    assert not store.exists(manifest_key(spec))
    assert run_stage("generate", uri, engine=tiny_engine, shard=1) is False  # resumable: done shards skip
    assert is_complete(store, shard_spec(spec, 1, 3))


def test_local_executor_runs_shards_as_parallel_processes(tmp_path, tiny_run_config, tiny_engine):
    store, spec = plan_generate(tiny_run_config, tmp_path / "store", generate__shards=2)
    log = LocalExecutor().run("generate", store.uri_for(spec.spec_key))
    assert "[shard 0]" in log and "[shard 1]" in log
    assert merge_stage("generate", store.uri_for(spec.spec_key))
    ref = run_sharded(store, spec, tiny_engine, 1, "runs/x/ref")
    out = Path(store.root) / spec.output
    assert (out / "sft.jsonl").read_bytes() == (ref / "sft.jsonl").read_bytes()


class InstantEngine:
    """Replies without a model, so the test measures the stage's own memory, not a model's."""

    def __init__(self):
        from jobs.engines.base import EngineStats

        self.stats = EngineStats()

    def generate(self, conversations, params, desc="generate"):
        self.stats.generated_tokens += len(conversations)
        return [f"reply {len(c)}" for c in conversations]


def test_generate_memory_does_not_grow_with_the_number_of_prompts(tmp_path):
    import tracemalloc

    from jobs.constitution import resolve_path

    store = LocalStore(tmp_path)
    store.write_bytes(CONSTITUTION_KEY, resolve_path("default").read_bytes())

    def peak(n: int) -> int:
        key = f"in/{n}.jsonl"
        store.write_jsonl(key, ({"id": f"p{i}", "kind": "ordinary", "messages": [{"role": "user", "content": f"question {i} " * 20}]} for i in range(n)))
        spec = StageSpec(stage="generate", run_id="t", round=1, store=store.uri, output=f"runs/t/out-{n}", model="none",
                         inputs={"constitution": CONSTITUTION_KEY, "prompts": key},
                         params=GenerateConfig(revision_rounds=1, few_shot=0, chunk_size=200).model_dump(mode="json"))
        store.write_json(spec.spec_key, spec.model_dump(mode="json"))
        tracemalloc.start()
        try:
            assert run_stage("generate", store.uri_for(spec.spec_key), engine=InstantEngine())
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(1_000), peak(10_000)
    assert sum(1 for _ in store.iter_lines("runs/t/out-10000/sft.jsonl")) == 10_000
    assert large < 1.5 * small, (small, large)  # 10x the prompts, about the same peak: inputs and outputs stream
