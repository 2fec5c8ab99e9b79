"""charts/cai/README.md's values tables are generated from values.yaml (charts/chart_readme.py): they
must be current, list every value with its default and a description, and go stale on a values change."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "cai"
sys.path.insert(0, str(REPO / "charts"))
try:
    import chart_readme
finally:
    sys.path.remove(str(REPO / "charts"))

ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| (?P<type>[^|]+) \| (?P<default>(?:[^|\\]|\\.)*) \| (?P<desc>(?:[^|\\]|\\.)*) \|$")


def rows(readme: str) -> dict[str, dict[str, str]]:
    body = readme.split(chart_readme.BEGIN, 1)[1].split(chart_readme.END, 1)[0]
    return {m["key"]: m.groupdict() for m in map(ROW.match, body.splitlines()) if m}


def leaves(node: object, path: str = "") -> dict[str, object]:
    if isinstance(node, dict) and node:
        out: dict[str, object] = {}
        for k, v in node.items():
            out |= leaves(v, f"{path}.{k}" if path else k)
        return out
    return {path: node}


def test_readme_values_are_current() -> None:
    current = (CHART / "README.md").read_text(encoding="utf-8")
    assert current == chart_readme.render(), f"charts/cai/README.md is stale: run `{chart_readme.COMMAND}`"


def test_every_value_has_a_row_with_its_default_and_a_description() -> None:
    table = rows(chart_readme.render())  # what the generator writes (the test above: and the README holds)
    values = leaves(yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8")))
    free_form = {"podSecurityContext", "controller.resources.requests", "controller.resources.limits", "networkPolicy.dns.podLabels"}
    for key, value in values.items():
        owner = next((f for f in free_form if key.startswith(f + ".")), key)  # maps the schema leaves open are one row
        assert owner in table, f"{owner} (values.yaml) has no row in charts/cai/README.md"
        row = table[owner]
        assert row["desc"].strip(), f"{owner}: no description (add a comment above it in values.yaml)"
        if owner == key:
            assert json.loads(row["default"].strip("`").replace("\\|", "|")) == value, key
    assert set(table) - set(values) - free_form <= {k for k, r in table.items() if r["default"] == ""}  # only parent rows besides


def test_comments_become_descriptions_and_sections() -> None:
    readme = chart_readme.render()
    table = rows(readme)
    assert table["modelCache.existingClaim"]["desc"].startswith("Name of an existing claim to mount instead")  # the comment above it
    assert table["run.realign.gates.alignment_tax_max"]["desc"] == "capability loss vs the base model at most 10%"  # inline
    assert table["stages.judge.cpu"]["desc"] == "CPU request."  # no comment: the schema's description
    assert table["images.pullPolicy"]["type"] == 'one of "Always", "IfNotPresent", "Never"'
    assert table["stages.train.gpuMemoryGiB"]["type"] == "number or null"
    assert "### `modelCache`\n\nModel cache: a PersistentVolumeClaim" in readme
    assert "### Scheduling of stage Jobs\n\n| Key |" in readme  # a heading over several keys, no repeated paragraph
    assert "&lt;fullname>-controller" in readme  # not swallowed as an HTML tag


def test_a_values_change_makes_it_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    values = (CHART / "values.yaml").read_text(encoding="utf-8")
    changed = values.replace("  size: 50Gi\n", "  size: 80Gi\n  # Keep the claim on uninstall.\n  keep: true\n")
    assert changed != values
    text = chart_readme.render(values_text=changed)
    assert text != (CHART / "README.md").read_text(encoding="utf-8")
    assert "| `modelCache.keep` | boolean | `true` | Keep the claim on uninstall. |" in text and "`\"80Gi\"`" in text
    # the command's --check says what to run
    readme = tmp_path / "README.md"
    readme.write_text((CHART / "README.md").read_text(encoding="utf-8").replace("| `modelCache.size` |", "| `modelCache.sise` |"))
    monkeypatch.setattr(chart_readme, "README", readme)
    monkeypatch.setattr(chart_readme, "REPO", tmp_path)
    assert chart_readme.main(["chart_readme.py", "--check"]) == 1
    assert f"README.md is stale: run `{chart_readme.COMMAND}`" in capsys.readouterr().err
