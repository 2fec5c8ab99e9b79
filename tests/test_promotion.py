"""The promotion pointer: create-only history, latest.json, races, rollback, `cai models`."""

from __future__ import annotations

import json
import threading

import pytest

from jobs import promotion
from jobs.cli import main
from jobs.errors import CaiError
from jobs.promotion import LATEST, PromotionConflict, Scores
from jobs.store import LocalStore


def promote(store, based_on, model, **kw):
    kw.setdefault("kind", "promote")
    return promotion.promote(store, based_on=based_on, model=model, run_id=kw.pop("run_id", "run-a"), round_=kw.pop("round_", 1),
                             scores=kw.pop("scores", Scores(harmless=0.5)), inputs=kw.pop("inputs", {"model": model, "prompts_sha256": "p1"}),
                             reason=kw.pop("reason", "test"), **kw)


@pytest.fixture
def chain(tmp_path):
    """initial (1) <- promoted (2) <- promoted (3)."""
    store = LocalStore(tmp_path)
    e1 = promote(store, None, "bundled:base", kind="initial", inputs={})
    e2 = promote(store, e1, "store:runs/a/round-1/train/model", scores=Scores(harmless=0.6, alignment_tax=1.5))
    e3 = promote(store, e2, "store:runs/b/round-2/train/model", run_id="run-b", round_=2)
    return store, (e1, e2, e3)


def test_promotions_append_history_and_publish_latest(chain, tmp_path):
    store, (e1, e2, e3) = chain
    latest = json.loads((tmp_path / LATEST).read_text())
    assert latest["current"]["seq"] == 3 and latest["current"]["model"] == e3.model
    assert [e["seq"] for e in latest["history"]] == [1, 2, 3]
    assert [e["parent"] for e in latest["history"]] == [None, 1, 2]
    assert latest["history"][1]["scores"]["alignment_tax"] == 1.5
    assert sorted(p.name for p in (tmp_path / "models/history").iterdir()) == ["000001.json", "000002.json", "000003.json"]
    assert e2.inputs_fingerprint == promotion.inputs_fingerprint(e2.inputs) and e1.inputs_fingerprint is None
    assert promotion.current(store) == e3


def test_racing_promoters_exactly_one_wins(chain, tmp_path):
    store, (_, _, e3) = chain
    errors, wins = [], []

    def go(i):
        try:
            wins.append(promote(store, e3, f"store:runs/race-{i}/round-1/train/model"))
        except PromotionConflict as e:
            errors.append(str(e))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(errors) == 5
    assert all("000004.json: another promotion or rollback took sequence 4 first" in e and "\n" not in e for e in errors)
    pointer = promotion.read_pointer(store)
    assert pointer.current.model == wins[0].model and [e.seq for e in pointer.history] == [1, 2, 3, 4]


def test_a_promotion_based_on_a_stale_entry_conflicts(chain):
    store, (_, e2, _) = chain
    with pytest.raises(PromotionConflict):
        promote(store, e2, "store:runs/late/round-1/train/model")  # started from 2, but 3 is current now
    assert promotion.current(store).seq == 3


def test_stale_latest_is_repaired_from_history(chain, tmp_path):
    store, (e1, e2, _) = chain
    stale = promotion.Pointer(current=e2, history=[e1, e2]).model_dump(mode="json")
    (tmp_path / LATEST).write_text(json.dumps(stale))  # a writer that crashed, or lost a race, left it behind
    assert promotion.read_pointer(store).current.seq == 3
    assert json.loads((tmp_path / LATEST).read_text())["current"]["seq"] == 3


def test_rollback_appends_and_never_rewrites_history(chain, tmp_path):
    store, (e1, e2, e3) = chain
    before = {p.name: p.read_bytes() for p in (tmp_path / "models/history").iterdir()}
    r4 = promotion.rollback(store)  # default: the model the current entry replaced
    assert (r4.seq, r4.kind, r4.model, r4.parent) == (4, "rollback", e2.model, 1)
    assert r4.scores == e2.scores and r4.run_id == e2.run_id and "from entry 3 to entry 2" in r4.reason
    # realignment resumes only when inputs change: the rolled-back state keeps entry 3's inputs
    assert r4.inputs == {**e3.inputs, "model": e2.model}
    r5 = promotion.rollback(store, note="bad batch of prompts")  # again: one further back
    assert (r5.model, r5.parent) == (e1.model, None) and r5.reason.endswith(": bad batch of prompts")
    with pytest.raises(CaiError, match="replaced no earlier entry; pass --to SEQ"):
        promotion.rollback(store)
    r6 = promotion.rollback(store, to=3)
    assert r6.model == e3.model and promotion.current(store) == r6
    with pytest.raises(CaiError, match="already current"):
        promotion.rollback(store, to=3)
    with pytest.raises(CaiError, match="no entry 42"):
        promotion.rollback(store, to=42)
    after = {p.name: p.read_bytes() for p in (tmp_path / "models/history").iterdir()}
    assert {k: after[k] for k in before} == before and len(after) == 6


def test_rollback_with_nothing_promoted(tmp_path):
    with pytest.raises(CaiError, match="nothing has been promoted yet"):
        promotion.rollback(LocalStore(tmp_path))


def test_cai_models_lists_marks_current_and_rolls_back(chain, tmp_path, capsys):
    store, (e1, e2, e3) = chain
    assert main(["models", "--store", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "seq" in lines[0]
    assert lines[3].startswith("*") and e3.model in lines[3] and not lines[1].startswith("*")
    assert "+1.5" in lines[2] and "0.600" in lines[2]

    assert main(["models", "rollback", "--store", str(tmp_path), "--to", "1", "--reason", "regression"]) == 0
    assert "entry 4: bundled:base is current again" in capsys.readouterr().out
    assert main(["models", "--store", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["current"]["seq"] == 4 and data["current"]["model"] == e1.model and len(data["history"]) == 4

    assert main(["models", "--store", str(tmp_path), "rollback", "--to", "4"]) == 1  # options before the action work too
    assert capsys.readouterr().err.startswith("error: ") and promotion.current(store).seq == 4


def test_cai_models_on_an_empty_store(tmp_path, capsys):
    assert main(["models", "--store", str(tmp_path)]) == 0
    assert "no promoted model" in capsys.readouterr().out
    assert main(["models", "--store", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"current": None, "history": []}


def test_racing_promoters_on_s3(s3_bucket, tmp_path):
    """The same race on a real S3 server: the history object is a conditional PUT."""
    from jobs.store_s3 import S3Store

    store = S3Store(f"s3://{s3_bucket}/cai", cache_root=tmp_path / "cache")
    e1 = promote(store, None, "bundled:base", kind="initial", inputs={})
    wins, losses = [], []

    def go(i):
        try:
            wins.append(promote(store, e1, f"store:runs/s3-{i}/round-1/train/model"))
        except PromotionConflict:
            losses.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 3
    r = promotion.rollback(store)
    pointer = promotion.read_pointer(store)
    assert pointer.current == r and r.model == "bundled:base" and [e.seq for e in pointer.history] == [1, 2, 3]
    assert store.read_json(LATEST)["current"]["seq"] == 3
