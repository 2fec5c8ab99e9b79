"""The chart version rule: charts/cai/versions.lock records one content hash per chart version
(charts/chart_version.py), the chart's content must match the line of the version in Chart.yaml, a
content change without a version bump fails saying what to do, and a recorded line never changes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "cai"
sys.path.insert(0, str(REPO / "charts"))
try:
    import chart_version as cv
finally:
    sys.path.remove(str(REPO / "charts"))


def test_chart_content_matches_its_version() -> None:
    version, digest = cv.current()
    why = cv.problem(version, digest, cv.read_lock(), cv.committed())
    assert why is None, why


def test_one_hash_per_version_and_each_version_new_content() -> None:
    entries = cv.read_lock()
    versions = [v for v, _ in entries]
    assert len(versions) == len(set(versions)), f"versions.lock records a version twice: {versions}"
    assert versions == sorted(versions, key=cv.version_key)
    version, digest = cv.current()
    assert versions[-1] == version, f"Chart.yaml says {version}, the newest recorded is {versions[-1]}"
    older = [d for v, d in entries if v != version]
    assert older and digest not in older, "the current version's content equals an older version's"
    assert len({d for _, d in entries}) == len(entries)


def test_recorded_lines_never_change() -> None:
    """Every line of the committed versions.lock is still there, unchanged (new lines may be added)."""
    committed = cv.committed()
    if not committed:
        pytest.skip("charts/cai/versions.lock is not committed yet (or this is no git checkout): nothing recorded to compare")
    now = cv.read_lock()
    assert [e for e in committed if e not in now] == [], "charts/cai/versions.lock: a committed line changed or went away"


def test_the_version_line_alone_is_not_content(tmp_path: Path) -> None:
    chart = shutil.copytree(CHART, tmp_path / "cai")
    before = cv.current(chart)
    text = (chart / "Chart.yaml").read_text(encoding="utf-8")
    (chart / "Chart.yaml").write_text(text.replace(f"version: {before[0]}", "version: 9.9.9"), encoding="utf-8")
    assert cv.current(chart) == ("9.9.9", before[1])
    (chart / "Chart.yaml").write_text(text.replace("appVersion:", "# a comment\nappVersion:"), encoding="utf-8")
    assert cv.current(chart)[1] != before[1]  # the rest of Chart.yaml is


@pytest.mark.parametrize("edit", ["templates/tests/test-store.yaml", "values.yaml", "values.schema.json", "templates/new.yaml"])
def test_a_change_without_a_bump_fails_then_a_bump_and_record_pass(tmp_path: Path, edit: str) -> None:
    chart = shutil.copytree(CHART, tmp_path / "cai")
    lock = tmp_path / "versions.lock"
    shutil.copy(cv.LOCK, lock)
    version, _ = cv.current(chart)
    path = chart / edit
    path.write_text((path.read_text(encoding="utf-8") if path.exists() else "") + "\n# changed\n", encoding="utf-8")

    version, digest = cv.current(chart)
    fixed = cv.read_lock(lock)  # as if every line were committed
    assert cv.problem(version, digest, cv.read_lock(lock), fixed) == (
        f"charts/cai changed since version {version} was recorded: bump `version` in Chart.yaml and run `{cv.COMMAND}`")
    assert cv.problem(version, digest, cv.read_lock(lock), None) == cv.problem(version, digest, cv.read_lock(lock), fixed)
    with pytest.raises(SystemExit, match=f"changed since version {version} was recorded"):
        cv.record(version, digest, lock, fixed)  # a committed line is never rewritten
    # a version not committed yet is under work: recorded again, in place
    uncommitted = [e for e in fixed if e[0] != version]
    assert "not committed yet" in cv.problem(version, digest, cv.read_lock(lock), uncommitted)
    scratch = tmp_path / "scratch.lock"
    shutil.copy(lock, scratch)
    cv.record(version, digest, scratch, uncommitted)
    assert dict(cv.read_lock(scratch))[version] == digest
    assert [e for e in cv.read_lock(scratch) if e[0] != version] == uncommitted

    bumped = version.rsplit(".", 1)[0] + "." + str(int(version.rsplit(".", 1)[1]) + 1)
    text = (chart / "Chart.yaml").read_text(encoding="utf-8")
    (chart / "Chart.yaml").write_text(text.replace(f"version: {version}", f"version: {bumped}"), encoding="utf-8")
    before = lock.read_text(encoding="utf-8")
    assert "is not recorded in versions.lock" in cv.problem(*cv.current(chart), cv.read_lock(lock))
    cv.record(*cv.current(chart), lock, fixed)
    assert cv.problem(*cv.current(chart), cv.read_lock(lock), fixed) is None
    after = lock.read_text(encoding="utf-8")
    assert after.startswith(before) and after[len(before):] == f"{bumped} sha256:{digest}\n"


def test_a_bump_without_a_change_or_backwards_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "versions.lock"
    shutil.copy(cv.LOCK, lock)
    version, digest = cv.current()
    with pytest.raises(SystemExit, match=f"same content as {version}"):
        cv.record("99.0.0", digest, lock)
    oldest = cv.read_lock(lock)[0][0]
    assert "is not newer than" in cv.problem("0.0.1", digest, cv.read_lock(lock)) and oldest != "0.0.1"
    assert cv.version_key("0.10.0") > cv.version_key("0.9.1") > cv.version_key("0.9.1-rc.1")


def test_the_command_checks_and_records(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "charts" / "chart_version.py"), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "charts" / "chart_version.py")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "already recorded" in proc.stdout, proc.stdout + proc.stderr
