"""Prompt loading: bundled sets, JSONL and `datasets` sources; bad rows are counted, never raised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.config import DataConfig, PromptSource
from jobs.data import BUNDLED_SETS, DATA_DIR, PromptRecord, SourceReport, load_prompts
from jobs.errors import DataError

MAX = 4000


def load(*sources: PromptSource, max_chars: int = MAX):
    return load_prompts(list(sources), max_chars)


def src(path, **kw) -> PromptSource:
    return PromptSource(source=str(path), **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    lines = []
    for r in rows:
        lines.append(r if isinstance(r, (str, bytes)) else json.dumps(r))
    data = b"".join((l if isinstance(l, bytes) else l.encode("utf-8")) + b"\n" for l in lines)
    path.write_bytes(data)
    return path


# --- bundled sets ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind, n_train, n_eval", [("red-team", "red-team", 150, 237), ("helpful", "ordinary", 228, 24)])
def test_bundled_train_and_eval_counts(name, kind, n_train, n_eval):
    train, [rep_t] = load(PromptSource(source=f"bundled:{name}"))
    evl, [rep_e] = load(PromptSource(source=f"bundled:{name}", split="eval"))
    both, _ = load(PromptSource(source=f"bundled:{name}", split=None))
    assert len(train) == n_train and len(evl) == n_eval and len(both) == n_train + n_eval
    assert rep_t.rows == rep_t.kept == n_train and not rep_t.dropped
    assert rep_e.rows == rep_e.kept == n_eval and not rep_e.dropped
    assert {r.kind for r in train + evl} == {kind}
    assert not {r.id for r in train} & {r.id for r in evl}
    norm = lambda r: " ".join(r.text.lower().split())
    assert not {norm(r) for r in train} & {norm(r) for r in evl}
    assert {r.id for r in both} == {r.id for r in train} | {r.id for r in evl}


def test_default_data_config_is_bundled_train():
    records, reports = load_prompts(DataConfig().train, MAX)
    assert [r.source for r in reports] == ["bundled:red-team", "bundled:helpful"]
    assert len(records) == 378
    assert sum(r.kind == "red-team" for r in records) == 150
    assert len({r.id for r in records}) == 378
    # order: sources in order, rows in file order
    assert records[0].kind == "red-team" and records[-1].kind == "ordinary"


def test_bundled_records_shape():
    records, _ = load(PromptSource(source="bundled:red-team"))
    r = records[0]
    assert r.id == "rt-001"
    assert r.messages == (("user", r.text),)
    assert r.conversation == [{"role": "user", "content": r.text}]
    assert PromptRecord.from_row(json.loads(json.dumps(r.to_row()))) == r


def test_unknown_bundled_set():
    with pytest.raises(DataError) as info:
        load(PromptSource(source="bundled:nope"))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("data.train[0]: bundled:nope: ")
    assert "bundled:red-team" in msg and "bundled:helpful" in msg


# --- bundled data files are well formed ---------------------------------------------------------


def rows_of(name: str) -> list[dict]:
    lines = (DATA_DIR / name).read_bytes().decode("utf-8").splitlines()
    assert all(l.strip() for l in lines), f"{name} has blank lines"
    return [json.loads(l) for l in lines]


ALL_FILES = sorted(p.name for p in DATA_DIR.glob("*.jsonl"))


def test_data_dir_has_expected_files():
    assert set(BUNDLED_SETS.values()) <= set(ALL_FILES)
    assert {"capability_mc.jsonl", "capability_exact.jsonl"} <= set(ALL_FILES)


@pytest.mark.parametrize("name", ALL_FILES)
def test_bundled_file_well_formed(name):
    rows = rows_of(name)
    assert rows
    ids = [r["id"] for r in rows]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert all(r.get("split") in ("train", "eval") for r in rows)


@pytest.mark.parametrize("name", sorted(BUNDLED_SETS.values()))
def test_prompt_file_well_formed(name):
    rows = rows_of(name)
    for r in rows:
        assert set(r) <= {"id", "prompt", "kind", "split", "category", "source", "license"}, r
        assert isinstance(r["prompt"], str) and r["prompt"].strip() == r["prompt"] and r["prompt"]
        assert r["kind"] in ("red-team", "ordinary", "borderline")
    norm = [" ".join(r["prompt"].lower().split()) for r in rows]
    assert len(norm) == len(set(norm)), "duplicate prompts"


def test_bundled_prompts_train_eval_disjoint_across_all_sets():
    train, evl = set(), set()
    for name in BUNDLED_SETS.values():
        for r in rows_of(name):
            (train if r["split"] == "train" else evl).add(" ".join(r["prompt"].lower().split()))
    assert train and evl
    assert not train & evl


def test_capability_mc_answers_valid():
    rows = rows_of("capability_mc.jsonl")
    assert rows
    for r in rows:
        choices = r["choices"]
        assert isinstance(choices, list) and len(choices) >= 2
        assert all(isinstance(c, str) and c for c in choices)
        assert len(set(choices)) == len(choices), r["id"]
        assert isinstance(r["answer"], int) and not isinstance(r["answer"], bool)
        assert 0 <= r["answer"] < len(choices), r["id"]
        assert isinstance(r["question"], str) and r["question"]


def test_capability_exact_well_formed():
    for r in rows_of("capability_exact.jsonl"):
        assert isinstance(r["question"], str) and r["question"]
        assert isinstance(r["answer"], str) and r["answer"]
        assert all(isinstance(a, str) and a for a in r.get("aliases", []))


# --- JSONL sources -----------------------------------------------------------------------------


def test_jsonl_prompt_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "  First prompt  "},
        {"prompt": "Second prompt", "kind": "red-team"},
        {"id": "c", "prompt": "Third", "kind": "ordinary"},
    ])
    records, [rep] = load(src(path))
    assert [r.text for r in records] == ["First prompt", "Second prompt", "Third"]
    assert records[0].id == "a" and records[2].id == "c"
    assert records[1].id == "p-00002"  # generated from the file stem and the row number
    assert [r.kind for r in records] == ["ordinary", "red-team", "ordinary"]
    assert (rep.source, rep.rows, rep.kept, dict(rep.dropped)) == (str(path), 3, 3, {})
    # an unknown kind is a typo that would silently make red-team prompts ordinary: one line, naming the row
    write_jsonl(path, [{"prompt": "x", "kind": "red-team"}, {"prompt": "y", "kind": "redteam"}])
    with pytest.raises(DataError, match=r"row 2: kind 'redteam' is not `red-team` or `ordinary`"):
        load(src(path))


def test_jsonl_split_filter(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "split": "train"},
        {"prompt": "b", "split": "eval"},
        {"prompt": "c"},
    ])
    assert [r.text for r in load(src(path))[0]] == ["a", "c"]
    assert [r.text for r in load(src(path, split="eval"))[0]] == ["b", "c"]
    assert [r.text for r in load(src(path, split=None))[0]] == ["a", "b", "c"]


def test_chat_messages(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": "m1", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
        ]},
        {"id": "m2", "messages": [{"role": "user", "content": "Only user"}]},
    ])
    records, [rep] = load(src(path))
    assert rep.kept == 2 and not rep.dropped
    m1 = records[0]
    assert m1.messages == (
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "What is 2+2?"),
    )
    assert m1.text == "What is 2+2?"
    assert m1.conversation[-1] == {"role": "user", "content": "What is 2+2?"}
    assert records[1].messages == (("user", "Only user"),)


@pytest.mark.parametrize("messages", [
    [{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "q"}, {"role": "human", "content": "q2"}],
    [{"role": "user"}],
    [{"role": "user", "content": 5}],
    ["just a string"],
    [],
    "not a list",
    [{"role": "assistant", "content": "only assistant"}],
    [{"role": "system", "content": "only system"}],
    [{"role": "user", "content": "q"}, {"role": "system", "content": "ends with system"}],
])
def test_bad_messages_dropped(tmp_path, messages):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}, {"prompt": "fine"}])
    records, [rep] = load(src(path))
    assert [r.text for r in records] == ["fine"]
    assert rep.rows == 2 and rep.kept == 1
    assert dict(rep.dropped) == {"bad_messages": 1}


def test_empty_last_user_turn_is_empty(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "   "}]}])
    _, [rep] = load(src(path))
    assert dict(rep.dropped) == {"empty": 1}


def test_drop_reasons_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": "ok1", "prompt": "Keep me"},
        "",                                   # empty line
        "   ",                                # whitespace-only line
        {"prompt": "   \t "},                 # whitespace-only prompt
        {"prompt": ""},                       # empty prompt
        b'{"prompt": "\xff\xfe bad bytes"}',  # not UTF-8
        b"\xff\xfe\x00\x01",                  # not UTF-8 at all
        "{not json",                          # invalid JSON
        "[1, 2, 3]",                          # JSON, but not an object
        '"a string"',                         # JSON, but not an object
        {"question": "no prompt column"},     # no prompt
        {"prompt": None},                     # null prompt
        {"prompt": 42},                       # not a string
        {"prompt": "x" * 101},                # too long
        {"prompt": "keep   ME"},              # duplicate of the first (case/whitespace)
        {"prompt": "Keep me"},                # exact duplicate
        {"id": "ok2", "prompt": "Also keep"},
    ])
    records, [rep] = load(src(path), max_chars=100)
    assert [r.id for r in records] == ["ok1", "ok2"]
    assert rep.rows == 17
    assert rep.kept == 2
    assert dict(rep.dropped) == {
        "empty": 4,
        "non_utf8": 2,
        "invalid_json": 3,
        "no_prompt": 2,
        "bad_messages": 1,
        "too_long": 1,
        "duplicate": 2,
    }
    assert rep.rows == rep.kept + sum(rep.dropped.values())
    assert rep.as_dict()["dropped"] == dict(sorted(rep.dropped.items()))
    assert rep.summary().startswith(f"{path}: 2/17 prompts kept (bad_messages 1, duplicate 2, empty 4, ")


def test_max_chars_boundary(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a" * 10}, {"prompt": "b" * 11}])
    records, [rep] = load(src(path), max_chars=10)
    assert [r.text for r in records] == ["a" * 10]
    assert dict(rep.dropped) == {"too_long": 1}


def test_max_chars_counts_whole_conversation(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "s" * 8},
        {"role": "user", "content": "u" * 8},
    ]}])
    _, [rep] = load(src(path), max_chars=10)
    assert dict(rep.dropped) == {"too_long": 1}
    records, _ = load(src(path), max_chars=16)
    assert len(records) == 1


def test_summary_when_nothing_dropped():
    assert SourceReport("x", rows=3, kept=3).summary() == "x: 3/3 prompts kept (none dropped)"


def test_duplicates_across_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "a1", "prompt": "Hello World"}, {"id": "a2", "prompt": "Other"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "b1", "prompt": "  hello\tworld "}, {"id": "b2", "prompt": "New"}])
    records, [ra, rb] = load(src(a), src(b))
    assert [r.id for r in records] == ["a1", "a2", "b2"]
    assert ra.kept == 2 and not ra.dropped
    assert rb.kept == 1 and dict(rb.dropped) == {"duplicate": 1}


def test_chat_and_plain_prompt_deduplicate(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Same question"},
        {"messages": [{"role": "user", "content": "same  QUESTION"}]},
        {"messages": [{"role": "system", "content": "ctx"}, {"role": "user", "content": "same question"}]},
    ])
    records, [rep] = load(src(path))
    assert len(records) == 2  # the one with a system turn is a different conversation
    assert dict(rep.dropped) == {"duplicate": 1}


def test_bundled_twice_is_all_duplicates():
    records, [r1, r2] = load(PromptSource(source="bundled:helpful"), PromptSource(source="bundled:helpful"))
    assert len(records) == 228
    assert r2.kept == 0 and dict(r2.dropped) == {"duplicate": 228}


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    records, [rep] = load(src(path, limit=3))
    assert [r.text for r in records] == ["p0", "p1", "p2"]
    assert rep.rows == 10 and rep.kept == 3
    assert dict(rep.dropped) == {"over_limit": 7}


def test_limit_counts_kept_rows_not_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ["", "{bad", {"prompt": "a"}, {"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    records, [rep] = load(src(path, limit=2))
    assert [r.text for r in records] == ["a", "b"]
    assert dict(rep.dropped) == {"empty": 1, "invalid_json": 1, "duplicate": 1, "over_limit": 1}


def test_limit_on_bundled():
    records, [rep] = load(PromptSource(source="bundled:red-team", limit=5))
    assert [r.id for r in records] == [r.id for r in load(PromptSource(source="bundled:red-team"))[0][:5]]
    assert rep.kept == 5 and rep.dropped["over_limit"] == 145


def test_limit_must_be_positive():
    from jobs.errors import ConfigError
    from jobs.schema import parse_data

    with pytest.raises(ConfigError):
        parse_data(PromptSource, {"source": "x", "limit": 0}, "cfg.yaml")


def test_kind_override(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "kind": "ordinary"}, {"prompt": "b"}])
    records, _ = load(src(path, kind="red-team"))
    assert [r.kind for r in records] == ["red-team", "red-team"]
    records, _ = load(PromptSource(source="bundled:red-team", kind="ordinary", limit=4))
    assert {r.kind for r in records} == {"ordinary"}


def test_custom_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "Q1", "prompt": "ignored"},
        {"question": "Q2", "messages": [{"role": "user", "content": "ignored"}]},
        {"prompt": "no question column"},
    ])
    records, [rep] = load(src(path, column="question"))
    assert [r.text for r in records] == ["Q1", "Q2"]
    assert dict(rep.dropped) == {"no_prompt": 1}


def test_prompt_column_wins_over_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "plain", "messages": [{"role": "user", "content": "chat"}]},
    ])
    records, _ = load(src(path))
    assert records[0].messages == (("user", "plain"),)


def test_ids_unique_and_generated(tmp_path):
    a = write_jsonl(tmp_path / "set.jsonl", [
        {"id": "x", "prompt": "one"},
        {"id": "x", "prompt": "two"},
        {"id": "x", "prompt": "three"},
        {"prompt": "four"},
        {"id": "", "prompt": "five"},
        {"id": 7, "prompt": "six"},
    ])
    b = write_jsonl(tmp_path / "set2.jsonl", [{"id": "x", "prompt": "seven"}, {"id": "set-00004", "prompt": "eight"}])
    records, _ = load(src(a), src(b))
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == 8
    assert all(isinstance(i, str) and i for i in ids)
    assert ids[0] == "x"
    assert ids[3] == "set-00004" and ids[4] == "set-00005" and ids[5] == "7"
    assert ids[7] != "set-00004"


def test_missing_source_raises_one_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load(src(missing))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"data.train[0]: {missing}: ")
    assert "not found" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    records, [rep] = load(src(path))
    assert records == [] and rep.rows == 0 and rep.kept == 0


def test_crlf_lines(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    records, [rep] = load(src(path))
    assert [r.text for r in records] == ["a", "b"] and not rep.dropped


def test_no_trailing_newline(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}')
    assert [r.text for r in load(src(path))[0]] == ["a", "b"]


def test_unicode_prompts(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Grüße, 世界 👋"}])
    assert load(src(path))[0][0].text == "Grüße, 世界 👋"


def test_utf8_bom_first_row_kept(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n{"prompt": "second"}\n')
    records, [rep] = load(src(path))
    assert [r.text for r in records] == ["first", "second"]


# --- datasets sources --------------------------------------------------------------------------


def test_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "ds"
    datasets.Dataset.from_list([
        {"id": "d1", "prompt": "From a dataset", "kind": "red-team"},
        {"id": "d2", "prompt": "   ", "kind": "ordinary"},
        {"id": "d3", "prompt": "from A dataset", "kind": "ordinary"},
        {"id": "d4", "prompt": "Another", "kind": "ordinary"},
    ]).save_to_disk(str(out))
    records, [rep] = load(src(out))
    assert [(r.id, r.text, r.kind) for r in records] == [("d1", "From a dataset", "red-team"), ("d4", "Another", "ordinary")]
    assert rep.rows == 4 and dict(rep.dropped) == {"empty": 1, "duplicate": 1}


def test_datasets_messages_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "chat-ds"
    datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
    ]).save_to_disk(str(out))
    records, _ = load(src(out))
    assert records[0].messages == (("user", "Q?"),)
    assert records[0].id == "chat-ds-00001"


def test_datasets_dict_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "t1"}, {"prompt": "t2"}]),
        "test": datasets.Dataset.from_list([{"prompt": "e1"}]),
    }).save_to_disk(str(out))
    assert [r.text for r in load(src(out))[0]] == ["t1", "t2"]
    assert [r.text for r in load(src(out, split="test"))[0]] == ["e1"]
    with pytest.raises(DataError) as info:
        load(src(out, split="validation"))
    msg = str(info.value)
    assert "\n" not in msg and "'validation'" in msg and "['test', 'train']" in msg


def test_datasets_split_column_not_filtered(tmp_path):
    """A saved dataset's split was chosen on load; a `split` column is just data."""
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "a", "split": "eval"}, {"prompt": "b", "split": "train"}]).save_to_disk(str(out))
    assert [r.text for r in load(src(out))[0]] == ["a", "b"]


def test_directory_that_is_not_a_dataset(tmp_path):
    pytest.importorskip("datasets")
    d = tmp_path / "not-a-dataset"
    d.mkdir()
    (d / "readme.txt").write_text("hello")
    with pytest.raises(DataError) as info:
        load(src(d))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"data.train[0]: {d}: cannot load dataset")


def test_datasets_dict_default_split_error_names_train(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "e1"}])}).save_to_disk(str(out))
    with pytest.raises(DataError) as info:
        load(src(out, split=None))
    assert "'train'" in str(info.value)
