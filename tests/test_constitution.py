"""Constitutions: shipped files, one-line ConfigErrors for each kind of mistake, the CLI, sampling."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.constitution import (
    SHIPPED_DIR,
    Constitution,
    load_constitution,
    resolve_path,
    sample_principle,
    shipped_names,
)
from jobs.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["customer-service", "default", "telehealth"]

GOOD = """\
name: mini
description: a tiny test constitution
principles:
  - name: alpha
    scope: red-team
    weight: 3
    critique: "Alpha critique."
    revision: "Alpha revision."
    comparison: "Alpha comparison (A) or (B)?"
  - name: beta
    scope: ordinary
    critique: "Beta critique."
    revision: "Beta revision."
    comparison: "Beta comparison (A) or (B)?"
  - name: gamma
    critique: "Gamma critique."
    revision: "Gamma revision."
    comparison: "Gamma comparison (A) or (B)?"
few_shot:
  - principle: beta
    prompt: "p"
    response: "r"
    critique: "c"
    revision: "v"
"""

P = "    critique: c\n    revision: r\n    comparison: x\n"


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | str) -> str:
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    assert msg.strip() == msg and msg
    return msg


# --- shipped constitutions -------------------------------------------------------------------


def test_shipped_names_are_the_three_files():
    assert shipped_names() == SHIPPED
    assert SHIPPED_DIR == REPO / "jobs" / "constitutions"  # package data: a plain install has them
    assert (REPO / "constitutions").resolve() == SHIPPED_DIR  # the top-level link, for paths in docs and configs


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_load_by_name_and_by_path(name):
    by_name = load_constitution(name)
    by_path = load_constitution(REPO / "constitutions" / f"{name}.yaml")
    by_str = load_constitution(str(REPO / "constitutions" / f"{name}.yaml"))
    assert isinstance(by_name, Constitution)
    assert by_name == by_path == by_str
    assert by_name.name == name
    assert len(by_name.principles) >= 3
    assert by_name.few_shot, "shipped constitutions carry worked examples"
    names = [p.name for p in by_name.principles]
    assert len(names) == len(set(names))
    for ex in by_name.few_shot:
        assert ex.principle in names
    # every prompt kind gets at least one principle scoped to it (or to all)
    for kind in ("red-team", "ordinary"):
        assert any(p.applies_to(kind) for p in by_name.principles)
    for p in by_name.principles:
        assert p.weight > 0
        assert "(A)" in p.comparison and "(B)" in p.comparison


def test_default_scopes():
    c = load_constitution("default")
    red = {p.name for p in c.for_kind("red-team")}
    ordinary = {p.name for p in c.for_kind("ordinary")}
    assert "harmless" in red and "harmless" not in ordinary
    assert "helpful" in ordinary and "helpful" not in red
    assert "honest" in red and "honest" in ordinary


def test_resolve_path_prefers_existing_file(tmp_path, monkeypatch):
    # a file named like a shipped constitution in the working directory wins over the shipped one
    write(tmp_path, "default", GOOD)
    monkeypatch.chdir(tmp_path)
    assert resolve_path("default") == Path("default")
    assert load_constitution("default").name == "mini"
    assert resolve_path("telehealth") == SHIPPED_DIR / "telehealth.yaml"


def test_as_system_prompt_falls_back_to_every_revision(tmp_path):
    c = load_constitution(write(tmp_path, "c.yaml", GOOD))
    assert c.system_prompt is None
    text = c.as_system_prompt()
    assert text.splitlines()[0].startswith("Follow these principles (mini)")
    for p in c.principles:
        assert f"- {p.revision}" in text


def test_shipped_constitutions_carry_their_own_system_prompt():
    for name in ("default", "telehealth", "customer-service"):
        c = load_constitution(name)
        assert c.system_prompt and c.as_system_prompt() == c.system_prompt.strip()
        assert "Rewrite the response" not in c.as_system_prompt()
    assert "emergency services" in load_constitution("telehealth").as_system_prompt()


def test_principle_lookup():
    c = load_constitution("telehealth")
    assert c.principle("privacy").name == "privacy"
    with pytest.raises(KeyError):
        c.principle("no-such-principle")


# --- one-line errors ---------------------------------------------------------------------------


def test_good_file_loads(tmp_path):
    c = load_constitution(write(tmp_path, "mini.yaml", GOOD))
    assert [p.name for p in c.principles] == ["alpha", "beta", "gamma"]
    assert c.principle("gamma").scope == "all" and c.principle("gamma").weight == 1.0


def test_json_constitution_loads(tmp_path):
    import json

    import yaml

    path = write(tmp_path, "mini.json", json.dumps(yaml.safe_load(GOOD)))
    assert load_constitution(path).name == "mini"


def test_bad_yaml_syntax(tmp_path):
    path = write(tmp_path, "c.yaml", "name: t\nprinciples:\n  - name: a\n    critique: c: d\n    revision: r\n")
    msg = config_error(path)
    assert str(path) in msg
    assert "line 4" in msg
    assert "invalid YAML" in msg and "fix the syntax" in msg


def test_bad_yaml_unclosed_bracket(tmp_path):
    path = write(tmp_path, "c.yaml", "name: t\nprinciples: [\n")
    msg = config_error(path)
    assert str(path) in msg and "invalid YAML" in msg


def test_bad_json_syntax(tmp_path):
    path = write(tmp_path, "c.json", '{"name": "t",\n "principles": [}\n')
    msg = config_error(path)
    assert str(path) in msg and "line 2" in msg and "invalid JSON" in msg and "fix the syntax" in msg


def test_not_utf8(tmp_path):
    path = write(tmp_path, "c.yaml", b"name: t\ndescription: \xff\xfe\n")
    msg = config_error(path)
    assert str(path) in msg and "UTF-8" in msg


def test_principle_without_critique(tmp_path):
    path = write(tmp_path, "c.yaml", "name: t\nprinciples:\n  - name: a\n    revision: r\n    comparison: x\n")
    msg = config_error(path)
    assert msg.startswith(f"{path}: ")
    assert "principles[0](a).critique" in msg
    assert "is required" in msg and "add the field" in msg


def test_field_path_names_the_right_entry(tmp_path):
    text = "name: t\nprinciples:\n  - name: a\n" + P + "  - name: b\n    critique: c\n    comparison: x\n"
    msg = config_error(write(tmp_path, "c.yaml", text))
    assert "principles[1](b).revision" in msg


def test_missing_principles(tmp_path):
    msg = config_error(write(tmp_path, "c.yaml", "name: t\n"))
    assert "principles" in msg and "is required" in msg


def test_empty_principle_list(tmp_path):
    path = write(tmp_path, "c.yaml", "name: t\nprinciples: []\n")
    msg = config_error(path)
    assert str(path) in msg and ": principles:" in msg
    assert "add at least one entry" in msg


def test_duplicate_principle_names(tmp_path):
    text = "name: t\nprinciples:\n  - name: a\n" + P + "  - name: b\n" + P + "  - name: a\n" + P
    path = write(tmp_path, "c.yaml", text)
    msg = config_error(path)
    assert str(path) in msg and ": principles:" in msg
    assert "duplicate principle name 'a'" in msg and "unique name" in msg


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "c.yaml", "name: t\nprincipals: []\nprinciples:\n  - name: a\n" + P)
    msg = config_error(path)
    assert msg.startswith(f"{path}: principals: ")
    assert "is not a known field" in msg and "check its spelling" in msg


def test_unknown_key_inside_principle(tmp_path):
    path = write(tmp_path, "c.yaml", "name: t\nprinciples:\n  - name: a\n" + P + "    critque: typo\n")
    msg = config_error(path)
    assert str(path) in msg and "principles[0](a).critque" in msg
    assert "is not a known field" in msg and "remove it or check its spelling" in msg


def test_few_shot_references_missing_principle(tmp_path):
    text = (
        "name: t\nprinciples:\n  - name: a\n" + P + "  - name: b\n" + P
        + "few_shot:\n  - {principle: a, prompt: p, response: r, critique: c, revision: v}\n"
        + "  - {principle: zeta, prompt: p, response: r, critique: c, revision: v}\n"
    )
    path = write(tmp_path, "c.yaml", text)
    msg = config_error(path)
    assert str(path) in msg
    assert "few_shot[1].principle" in msg and "'zeta'" in msg
    assert "use one of ['a', 'b']" in msg


def test_bad_scope(tmp_path):
    path = write(tmp_path, "c.yaml", "name: t\nprinciples:\n  - name: a\n" + P + "    scope: everyone\n")
    msg = config_error(path)
    assert str(path) in msg and "principles[0](a).scope" in msg
    # says which values are allowed
    assert "'red-team'" in msg and "'ordinary'" in msg and "'all'" in msg


@pytest.mark.parametrize("weight", ["0", "-1", "-0.5"])
def test_weight_not_positive(tmp_path, weight):
    path = write(tmp_path, "c.yaml", "name: t\nprinciples:\n  - name: a\n" + P + f"    weight: {weight}\n")
    msg = config_error(path)
    assert str(path) in msg and "principles[0](a).weight" in msg
    assert "greater than 0" in msg


def test_bad_principle_name(tmp_path):
    path = write(tmp_path, "c.yaml", "name: t\nprinciples:\n  - name: Not Valid\n" + P)
    msg = config_error(path)
    assert "principles[0](Not Valid).name" in msg and "pattern" in msg


def test_first_error_reported_and_rest_counted(tmp_path):
    text = "name: t\nbogus: 1\nprinciples:\n  - name: a\n    weight: 0\n"
    msg = config_error(write(tmp_path, "c.yaml", text))
    assert "more)" in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# just a comment\n"])
def test_empty_file(tmp_path, text):
    path = write(tmp_path, "c.yaml", text)
    msg = config_error(path)
    assert msg.startswith(f"{path}: ")
    assert "empty" in msg and "add the required fields" in msg


def test_top_level_is_a_list(tmp_path):
    path = write(tmp_path, "c.yaml", "- name: a\n- name: b\n")
    msg = config_error(path)
    assert str(path) in msg and "<top level>" in msg
    assert "expected a mapping, got list" in msg and "key: value" in msg


def test_top_level_is_a_scalar(tmp_path):
    msg = config_error(write(tmp_path, "c.yaml", "just a string\n"))
    assert "expected a mapping, got str" in msg


def test_file_not_found(tmp_path):
    path = tmp_path / "missing.yaml"
    msg = config_error(path)
    assert str(path) in msg and "not found" in msg
    assert "shipped name" in msg and "default" in msg


def test_unknown_shipped_name():
    msg = config_error("no-such-constitution")
    assert msg.startswith("no-such-constitution: ")
    assert "not found" in msg
    for name in SHIPPED:
        assert name in msg


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_validate_shipped(capsys):
    files = sorted(str(p) for p in (REPO / "constitutions").glob("*.yaml"))
    assert len(files) == 3
    assert main(["constitution", "validate", *files]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 3
    for f, line in zip(files, lines):
        assert line.startswith(f"{f}: ok (")
    assert "default, 7 principles, 4 few-shot examples" in out


def test_cli_validate_good_and_bad(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", GOOD)
    bad = write(tmp_path, "bad.yaml", "name: t\nprinciples:\n  - name: a\n" + P + "    weight: 0\n")
    assert main(["constitution", "validate", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert f"{good}: ok (mini, 3 principles, 1 few-shot examples)" in out
    assert str(bad) not in out
    err_lines = err.splitlines()
    assert len(err_lines) == 1
    assert err_lines[0].startswith(f"error: {bad}: ")
    assert "principles[0](a).weight" in err_lines[0]


def test_cli_validate_continues_after_bad_file(tmp_path, capsys):
    bad1 = write(tmp_path, "bad1.yaml", "")
    bad2 = write(tmp_path, "bad2.yaml", "- x\n")
    good = write(tmp_path, "good.yaml", GOOD)
    assert main(["constitution", "validate", str(bad1), str(good), str(bad2)]) == 2
    out, err = capsys.readouterr()
    assert out.count(": ok (") == 1
    assert [l.split(":")[1].strip() for l in err.splitlines()] == [str(bad1), str(bad2)]


def test_cli_validate_shipped_name(capsys):
    assert main(["constitution", "validate", "telehealth"]) == 0
    assert "telehealth: ok (telehealth, 6 principles" in capsys.readouterr().out


def test_cli_show_prints_principles(capsys):
    assert main(["constitution", "show", "default"]) == 0
    out = capsys.readouterr().out
    c = load_constitution("default")
    assert out.startswith(f"default: {c.description}")
    for p in c.principles:
        assert f"- {p.name}  (scope {p.scope}, weight {p.weight:g}" in out
        assert p.critique in out and p.revision in out and p.comparison in out
    assert "few-shot examples: 4" in out


def test_cli_show_shares_are_per_prompt_kind(tmp_path, capsys):
    path = write(tmp_path, "c.yaml", GOOD)
    assert main(["constitution", "show", str(path)]) == 0
    out = capsys.readouterr().out
    # red-team pool: alpha (3) + gamma (1); ordinary pool: beta (1) + gamma (1)
    assert "weight 3: 75% of red-team draws, 0% of ordinary draws" in out
    assert "weight 1: 0% of red-team draws, 50% of ordinary draws" in out
    assert "weight 1: 25% of red-team draws, 50% of ordinary draws" in out


def test_cli_show_scoped_principle_gets_no_draws_for_other_kind(capsys):
    assert main(["constitution", "show", "default"]) == 0
    out = capsys.readouterr().out
    harmless = next(l for l in out.splitlines() if l.startswith("- harmless"))
    assert "0% of ordinary draws" in harmless and "31% of red-team draws" in harmless


def test_cli_show_bad_file_one_line_error(tmp_path, capsys):
    assert main(["constitution", "show", str(tmp_path / "nope.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


# --- sampling ----------------------------------------------------------------------------------


@pytest.fixture
def mini(tmp_path) -> Constitution:
    return load_constitution(write(tmp_path, "mini.yaml", GOOD))


def test_sample_is_deterministic():
    c = load_constitution("default")
    for step in range(5):
        a = sample_principle(c, "red-team", 7, "rt-001", step)
        b = sample_principle(c, "red-team", 7, "rt-001", step)
        assert a is b or a == b


def test_sample_does_not_depend_on_hash_seed():
    code = (
        "from jobs.constitution import load_constitution, sample_principle\n"
        "c = load_constitution('default')\n"
        "print(','.join(sample_principle(c, 'red-team', 3, f'p{i}', i % 3).name for i in range(40)))\n"
    )
    outs = set()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert res.returncode == 0, res.stderr
        outs.add(res.stdout.strip())
    c = load_constitution("default")
    here = ",".join(sample_principle(c, "red-team", 3, f"p{i}", i % 3).name for i in range(40))
    assert outs == {here}


def test_sample_varies_across_steps_and_seeds():
    c = load_constitution("default")
    by_step = {sample_principle(c, "red-team", 0, "rt-001", step).name for step in range(30)}
    by_seed = {sample_principle(c, "red-team", seed, "rt-001", 0).name for seed in range(30)}
    by_prompt = {sample_principle(c, "red-team", 0, f"rt-{i:03d}", 0).name for i in range(30)}
    assert len(by_step) >= 3
    assert len(by_seed) >= 3
    assert len(by_prompt) >= 3
    seq_a = [sample_principle(c, "red-team", 0, "x", s).name for s in range(20)]
    seq_b = [sample_principle(c, "red-team", 1, "x", s).name for s in range(20)]
    assert seq_a != seq_b


@pytest.mark.parametrize("name", SHIPPED)
def test_sample_respects_scope(name):
    c = load_constitution(name)
    for kind in ("red-team", "ordinary"):
        allowed = {p.name for p in c.principles if p.scope in (kind, "all")}
        drawn = {sample_principle(c, kind, s, f"id-{s}", s % 4).name for s in range(300)}
        assert drawn <= allowed
        assert drawn == allowed  # every eligible principle does get drawn


def test_sample_scope_mini(mini):
    red = Counter(sample_principle(mini, "red-team", 0, f"p{i}", 0).name for i in range(500))
    ordinary = Counter(sample_principle(mini, "ordinary", 0, f"p{i}", 0).name for i in range(500))
    assert set(red) == {"alpha", "gamma"}
    assert set(ordinary) == {"beta", "gamma"}


def test_weights_matter_statistically(tmp_path):
    text = (
        "name: w\nprinciples:\n"
        "  - {name: heavy, weight: 3, critique: c, revision: r, comparison: x}\n"
        "  - {name: light, weight: 1, critique: c, revision: r, comparison: x}\n"
    )
    c = load_constitution(write(tmp_path, "w.yaml", text))
    counts = Counter(sample_principle(c, "ordinary", 11, f"prompt-{i}", i % 4).name for i in range(2000))
    assert counts["heavy"] + counts["light"] == 2000
    ratio = counts["heavy"] / counts["light"]
    # expected 1500/500; the 99.99% band of a binomial(2000, 0.75) is roughly 1420..1580
    assert 2.4 < ratio < 3.8, counts


def test_fractional_weights(tmp_path):
    text = (
        "name: w\nprinciples:\n"
        "  - {name: rare, weight: 0.1, critique: c, revision: r, comparison: x}\n"
        "  - {name: common, weight: 0.9, critique: c, revision: r, comparison: x}\n"
    )
    c = load_constitution(write(tmp_path, "w.yaml", text))
    counts = Counter(sample_principle(c, "ordinary", 0, f"p{i}", 0).name for i in range(2000))
    assert 120 < counts["rare"] < 290, counts


def test_for_kind_falls_back_to_all(tmp_path):
    text = (
        "name: r\nprinciples:\n"
        "  - {name: one, scope: red-team, critique: c, revision: r, comparison: x}\n"
        "  - {name: two, scope: red-team, weight: 2, critique: c, revision: r, comparison: x}\n"
    )
    c = load_constitution(write(tmp_path, "r.yaml", text))
    assert [p.name for p in c.for_kind("red-team")] == ["one", "two"]
    assert [p.name for p in c.for_kind("ordinary")] == ["one", "two"]
    drawn = {sample_principle(c, "ordinary", 0, f"p{i}", 0).name for i in range(100)}
    assert drawn == {"one", "two"}


def test_for_kind_no_fallback_when_some_match(mini):
    assert [p.name for p in mini.for_kind("red-team")] == ["alpha", "gamma"]
    assert [p.name for p in mini.for_kind("ordinary")] == ["beta", "gamma"]
    # an unknown kind only gets the `all` principles
    assert [p.name for p in mini.for_kind("borderline")] == ["gamma"]


@pytest.mark.parametrize(
    "text",
    [
        'name: t\n"foo\\nbar": 1\nprinciples:\n  - {name: a, critique: c, revision: r, comparison: x}\n',
        'name: t\nprinciples:\n  - {name: "x\\ny", revision: r, comparison: x}\n',
    ],
    ids=["unknown-key", "principle-name"],
)
def test_error_is_one_line_even_with_newline_in_key(tmp_path, text):
    config_error(write(tmp_path, "c.yaml", text))
