"""RunConfig / StageSpec: strict validation with one-line errors, defaults, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.config import (
    BUNDLED_MODEL,
    PromptSource,
    RunConfig,
    StageSpec,
    canonical_hash,
    load_run_config,
)
from jobs.errors import ConfigError
from jobs.schema import StrictModel, format_validation_error, load_file, parse_data, read_structured

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_error(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    return msg


# --- defaults ----------------------------------------------------------------------------------


def test_defaults_with_none():
    c = load_run_config(None)
    assert isinstance(c, RunConfig)
    assert c.name == "cai" and c.model == BUNDLED_MODEL and c.constitution == "default"
    assert [s.source for s in c.data.train] == ["bundled:red-team", "bundled:helpful"]
    assert all(s.split == "train" and s.kind is None and s.limit is None for s in c.data.train)
    assert c.data.max_prompt_chars == 4000
    assert c.engine.backend == "auto" and c.engine.batch_size == 32 and c.engine.trust_remote_code is False
    assert c.generate.revision_rounds == 2 and c.generate.few_shot == 1 and c.generate.temperature == 0.0
    assert c.stages == ["generate", "judge", "train", "evaluate"] and c.rounds == 1 and c.seed == 0
    assert c.store == "./cai-store"


def test_default_factories_are_independent():
    a, b = RunConfig(), RunConfig()
    a.data.train.append(PromptSource(source="x.jsonl"))
    assert len(b.data.train) == 2


def test_partial_file_keeps_other_defaults(tmp_path):
    c = load_run_config(write(tmp_path, "seed: 7\ngenerate:\n  revision_rounds: 4\n"))
    assert c.seed == 7 and c.generate.revision_rounds == 4
    assert c.generate.few_shot == 1 and c.engine.batch_size == 32
    assert c == RunConfig(seed=7, generate={"revision_rounds": 4})


def test_full_file(tmp_path):
    text = """\
name: my-run
model: /models/x
constitution: telehealth
data:
  train:
    - source: bundled:red-team
      limit: 5
    - {source: prompts.jsonl, split: null, kind: ordinary, column: question}
  max_prompt_chars: 1000
engine: {backend: hf, dtype: float32, device: cpu, batch_size: 4}
generate: {revision_rounds: 3, few_shot: 0, temperature: 0.7, top_p: 0.9, chunk_size: 16}
stages: [generate]
rounds: 3
seed: 42
store: /tmp/somewhere
"""
    c = load_run_config(write(tmp_path, text))
    assert c.data.train[1].split is None and c.data.train[1].column == "question"
    assert c.engine.dtype == "float32" and c.generate.top_p == 0.9 and c.rounds == 3


def test_json_run_config(tmp_path):
    c = load_run_config(write(tmp_path, '{"seed": 3, "generate": {"few_shot": 2}}', "run.json"))
    assert c.seed == 3 and c.generate.few_shot == 2


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load(path):
    c = load_run_config(path)
    assert c.constitution in ("default", "telehealth", "customer-service") or Path(c.constitution).suffix == ".yaml"


# --- one-line errors ---------------------------------------------------------------------------


def test_revision_rounds_zero(tmp_path):
    msg = run_error(tmp_path, "generate: {revision_rounds: 0}\n")
    assert ": generate.revision_rounds: " in msg
    assert "greater than or equal to 1" in msg


def test_revision_rounds_too_many(tmp_path):
    msg = run_error(tmp_path, "generate:\n  revision_rounds: 9\n")
    assert "generate.revision_rounds" in msg and "less than or equal to 8" in msg


def test_stage_listed_twice(tmp_path):
    msg = run_error(tmp_path, "stages: [generate, generate]\n")
    assert ": stages: " in msg and "listed twice" in msg and "list each stage once" in msg


def test_no_stages(tmp_path):
    msg = run_error(tmp_path, "stages: []\n")
    assert ": stages: " in msg and "add at least one entry" in msg


def test_unknown_stage(tmp_path):
    msg = run_error(tmp_path, "stages: [generate, distill]\n")
    assert "stages[1]" in msg and "'generate'" in msg and "'evaluate'" in msg


@pytest.mark.parametrize(
    "text, path",
    [
        ("seeed: 1\n", "seeed"),
        ("generate: {revison_rounds: 2}\n", "generate.revison_rounds"),
        ("engine: {batchsize: 2}\n", "engine.batchsize"),
        ("data: {train: [{source: a.jsonl, limt: 3}]}\n", "data.train[0].limt"),
        ("data: {max_chars: 3}\n", "data.max_chars"),
    ],
)
def test_unknown_keys(tmp_path, text, path):
    msg = run_error(tmp_path, text)
    assert f": {path}: is not a known field; remove it or check its spelling" in msg


@pytest.mark.parametrize(
    "text, path, words",
    [
        ("rounds: 0\n", "rounds", "greater than or equal to 1"),
        ("seed: abc\n", "seed", "valid integer"),
        ("name: Bad_Name\n", "name", "pattern"),
        ("model: 5\n", "model", "valid string"),
        ("engine: {backend: tgi}\n", "engine.backend", "'auto', 'hf' or 'vllm'"),
        ("engine: {dtype: int8}\n", "engine.dtype", "'float32'"),
        ("engine: {batch_size: 0}\n", "engine.batch_size", "greater than 0"),
        ("generate: {top_p: 1.5}\n", "generate.top_p", "less than or equal to 1"),
        ("generate: {top_p: 0}\n", "generate.top_p", "greater than 0"),
        ("generate: {temperature: -0.1}\n", "generate.temperature", "greater than or equal to 0"),
        ("generate: {few_shot: -1}\n", "generate.few_shot", "greater than or equal to 0"),
        ("generate: {max_new_tokens: 0}\n", "generate.max_new_tokens", "greater than 0"),
        ("generate: {revision_rounds: 2.5}\n", "generate.revision_rounds", "integer"),
        ("generate: [1, 2]\n", "generate", "dictionary"),
        ("data: {max_prompt_chars: 0}\n", "data.max_prompt_chars", "greater than 0"),
        ("data: {train: [{source: a.jsonl, limit: 0}]}\n", "data.train[0].limit", "greater than 0"),
        ("data: {train: [{source: a.jsonl, kind: weird}]}\n", "data.train[0].kind", "'red-team' or 'ordinary'"),
        ("data: {train: [{split: train}]}\n", "data.train[0].source", "is required; add the field"),
        ("data: {train: [{source: a.jsonl}, {source: b.jsonl, limit: -2}]}\n", "data.train[1].limit", "greater than 0"),
    ],
)
def test_bad_values(tmp_path, text, path, words):
    msg = run_error(tmp_path, text)
    assert f": {path}: " in msg
    assert words in msg


def test_error_counts_the_rest(tmp_path):
    msg = run_error(tmp_path, "rounds: 0\nseed: x\nfoo: 1\n")
    assert msg.endswith("(+2 more)")


def test_empty_run_config_file(tmp_path):
    msg = run_error(tmp_path, "")
    assert "<top level>" in msg and "empty" in msg


def test_run_config_not_a_mapping(tmp_path):
    msg = run_error(tmp_path, "- generate\n")
    assert "expected a mapping, got list" in msg


def test_run_config_bad_yaml(tmp_path):
    msg = run_error(tmp_path, "generate:\n  revision_rounds: [1\n")
    assert "invalid YAML" in msg and "line" in msg


def test_run_config_missing_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value) == f"{path}: file not found; check the path"


def test_read_structured_prefers_json_for_json_suffix(tmp_path):
    # a JSON file with YAML-only syntax must be rejected, not parsed as YAML
    path = write(tmp_path, "seed: 1\n", "run.json")
    with pytest.raises(ConfigError) as info:
        read_structured(path)
    assert "invalid JSON" in str(info.value)


def test_assignment_is_validated():
    c = RunConfig()
    with pytest.raises(ValidationError):
        c.rounds = 0
    c.rounds = 3
    assert c.rounds == 3


# --- schema helpers -----------------------------------------------------------------------------


class _Item(StrictModel):
    name: str
    size: int


class _Box(StrictModel):
    items: list[_Item]


def test_parse_data_names_list_entries_by_name():
    data = {"items": [{"name": "a", "size": 1}, {"name": "bee", "size": "big"}]}
    with pytest.raises(ConfigError) as info:
        parse_data(_Box, data, "box.yaml")
    assert str(info.value).startswith("box.yaml: items[1](bee).size: ")


def test_parse_data_entry_without_name():
    with pytest.raises(ConfigError) as info:
        parse_data(_Box, {"items": [{"size": 1}]}, "box.yaml")
    assert str(info.value) == "box.yaml: items[0].name: is required; add the field"


def test_format_validation_error_top_level():
    try:
        _Item.model_validate("not a dict")
    except ValidationError as err:
        msg = format_validation_error("x.yaml", err, "not a dict")
    assert msg.startswith("x.yaml: <top level>: ") and "\n" not in msg


def test_load_file_generic(tmp_path):
    path = write(tmp_path, "name: a\nsize: 2\n", "item.yaml")
    assert load_file(_Item, path) == _Item(name="a", size=2)


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_is_stable_hex():
    fp = RunConfig().fingerprint()
    assert fp == RunConfig().fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0


def test_fingerprint_ignores_store_and_rounds():
    base = RunConfig()
    assert RunConfig(store="/elsewhere").fingerprint() == base.fingerprint()
    assert RunConfig(rounds=5).fingerprint() == base.fingerprint()
    assert RunConfig(store="s3://b/p", rounds=9).fingerprint() == base.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"name": "other"},
        {"model": "/models/x"},
        {"constitution": "telehealth"},
        {"generate": {"revision_rounds": 3}},
        {"generate": {"temperature": 0.5}},
        {"engine": {"dtype": "float32"}},
        {"data": {"max_prompt_chars": 100}},
        {"data": {"train": [{"source": "bundled:red-team", "limit": 3}]}},
    ],
)
def test_fingerprint_changes_with_results_affecting_fields(change):
    assert RunConfig(**change).fingerprint() != RunConfig().fingerprint()


def test_fingerprint_same_from_file_and_code(tmp_path):
    from_file = load_run_config(write(tmp_path, "seed: 3\nstore: /a\nrounds: 2\n"))
    assert from_file.fingerprint() == RunConfig(seed=3).fingerprint()
    # key order in the file does not matter
    other = load_run_config(write(tmp_path, "rounds: 4\nseed: 3\n", "other.yaml"))
    assert other.fingerprint() == from_file.fingerprint()


def test_canonical_hash_key_order_and_unicode():
    assert canonical_hash({"a": 1, "b": [1, 2]}) == canonical_hash({"b": [1, 2], "a": 1})
    assert canonical_hash({"a": "ü"}) != canonical_hash({"a": "u"})
    assert canonical_hash([1, 2]) != canonical_hash([2, 1])


# --- StageSpec ---------------------------------------------------------------------------------


def _spec(**kw) -> StageSpec:
    base = dict(stage="generate", run_id="r1", round=1, store="/s", output="runs/r1/round-1/generate", model=BUNDLED_MODEL)
    return StageSpec(**{**base, **kw})


def test_stage_spec_hash_ignores_store():
    assert _spec().spec_hash() == _spec(store="/other").spec_hash()
    assert _spec().spec_hash() != _spec(seed=1).spec_hash()
    assert _spec().spec_hash() != _spec(params={"revision_rounds": 3}).spec_hash()
    assert _spec().spec_key == "runs/r1/round-1/generate/spec.json"


def test_stage_spec_strict():
    with pytest.raises(ConfigError) as info:
        parse_data(StageSpec, {**_spec().model_dump(mode="json"), "extra": 1}, "spec.json")
    assert "spec.json: extra: is not a known field" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_data(StageSpec, {**_spec().model_dump(mode="json"), "round": -1}, "spec.json")
    assert "spec.json: round: " in str(info.value)


def test_stage_spec_round_trip():
    s = _spec(inputs={"prompts": "runs/r1/inputs/prompts.jsonl"}, params={"few_shot": 1})
    again = parse_data(StageSpec, s.model_dump(mode="json"), "spec.json")
    assert again == s and again.spec_hash() == s.spec_hash()
