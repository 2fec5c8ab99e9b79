"""Record the content hash of charts/cai for its current `version` in charts/cai/versions.lock.

The rule: any change to what the chart ships (templates/, values.yaml, values.schema.json, Chart.yaml
apart from its `version:` line) is a new chart version. versions.lock holds one `<version> sha256:<hex>`
line per version; tests/test_chart_version.py fails when the content no longer matches the line of
the version in Chart.yaml, and a committed line never changes (one not committed yet, the version
under work, is recorded again). After changing the chart, bump `version` in Chart.yaml and run:

    .venv/bin/python charts/chart_version.py            # record the current version's hash
    .venv/bin/python charts/chart_version.py --check    # exit 1, saying what to do, when it is not recorded
    .venv/bin/python charts/chart_version.py --at REV   # record the version as of git commit REV (backfill)
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "cai"
LOCK = CHART / "versions.lock"
COMMAND = ".venv/bin/python charts/chart_version.py"
HEADER = """\
# Content hash of charts/cai for each chart version: templates/, values.yaml, values.schema.json and
# Chart.yaml without its `version:` line. Written by `.venv/bin/python charts/chart_version.py`; a
# committed line never changes (a changed chart is a new version; the one under work is recorded again).
# 0.2.0 as of commit 597eba0, where it was set.
"""
_VERSION_LINE = re.compile(r"^version:\s*(\S+)\s*$", re.M)
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_ENTRY = re.compile(r"^(?P<version>\S+) sha256:(?P<hash>[0-9a-f]{64})$")
SHIPPED = ("Chart.yaml", "values.yaml", "values.schema.json")


def version_key(version: str) -> tuple:
    """Semver order: 0.10.0 > 0.9.0, and 0.3.0-rc.1 < 0.3.0."""
    m = _SEMVER.match(version)
    if not m:
        raise ValueError(f"chart version {version!r} is not semver (MAJOR.MINOR.PATCH)")
    major, minor, patch, pre = m.groups()
    return int(major), int(minor), int(patch), pre is None, pre or ""


def chart_version(chart_yaml: str) -> str:
    m = _VERSION_LINE.search(chart_yaml)
    if not m:
        raise ValueError("Chart.yaml has no `version:` line")
    return m.group(1).strip("\"'")


def content_hash(names: list[str], read: Callable[[str], bytes]) -> str:
    """sha256 over each shipped file (path, size, bytes; Chart.yaml without its version line), in path order."""
    h = hashlib.sha256()
    for name in sorted(names):
        data = read(name)
        if name == "Chart.yaml":
            data = _VERSION_LINE.sub("", data.decode("utf-8")).encode("utf-8")
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def shipped_files(chart: Path) -> list[str]:
    templates = [p.relative_to(chart).as_posix() for p in sorted((chart / "templates").rglob("*")) if p.is_file()]
    return [n for n in SHIPPED if (chart / n).exists()] + templates


def current(chart: Path = CHART) -> tuple[str, str]:
    """(version in Chart.yaml, content hash) of the chart directory."""
    version = chart_version((chart / "Chart.yaml").read_text(encoding="utf-8"))
    return version, content_hash(shipped_files(chart), lambda n: (chart / n).read_bytes())


def at_commit(rev: str, chart: Path = CHART) -> tuple[str, str]:
    """(version, content hash) of the chart as of a git commit."""
    rel = chart.relative_to(REPO).as_posix()

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=True).stdout

    listed = git("ls-tree", "-r", "--name-only", rev, "--", *(f"{rel}/{n}" for n in SHIPPED), f"{rel}/templates").decode().split()
    names = [n[len(rel) + 1:] for n in listed]
    read = lambda n: git("show", f"{rev}:{rel}/{n}")  # noqa: E731
    return chart_version(read("Chart.yaml").decode("utf-8")), content_hash(names, read)


def read_lock(lock: Path = LOCK) -> list[tuple[str, str]]:
    """The recorded (version, hash) lines, in file order (duplicates kept, so a test can see them)."""
    if not lock.exists():
        return []
    entries = []
    for n, line in enumerate(lock.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _ENTRY.match(line.strip())
        if not m:
            raise ValueError(f"{lock}:{n}: expected `<version> sha256:<64 hex>`, got {line!r}")
        entries.append((m["version"], m["hash"]))
    return entries


def committed(lock: Path = LOCK) -> list[tuple[str, str]] | None:
    """The lines of versions.lock as of git HEAD: [] when it is not committed yet, None without git."""
    proc = subprocess.run(["git", "-C", str(REPO), "show", f"HEAD:{lock.relative_to(REPO).as_posix()}"], capture_output=True, text=True)
    if proc.returncode != 0:
        inside = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode == 0
        return [] if inside else None
    return [(m["version"], m["hash"]) for m in map(_ENTRY.match, proc.stdout.splitlines()) if m]


def problem(version: str, digest: str, entries: list[tuple[str, str]], fixed: list[tuple[str, str]] | None = None) -> str | None:
    """Why the chart's content and versions.lock disagree, or None. `fixed`: the lines that may not
    change (committed ones; None = all, as in a checkout without git history)."""
    recorded = dict(entries)
    if version not in recorded:
        newest = max((v for v, _ in entries), key=version_key, default=None)
        if newest and version_key(version) <= version_key(newest):
            return f"charts/cai version {version} is not newer than {newest}, the newest in versions.lock: bump `version` in Chart.yaml past it and run `{COMMAND}`"
        return f"charts/cai version {version} is not recorded in versions.lock: run `{COMMAND}`"
    if recorded[version] != digest:
        if fixed is not None and version not in dict(fixed):
            return f"charts/cai changed since version {version} was recorded (not committed yet, so it may change): run `{COMMAND}`"
        return f"charts/cai changed since version {version} was recorded: bump `version` in Chart.yaml and run `{COMMAND}`"
    return None


def record(version: str, digest: str, lock: Path = LOCK, fixed: list[tuple[str, str]] | None = None) -> str:
    """Add the line for `version`. A committed line (`fixed`; None = every line) is never rewritten; one
    that is not committed yet is (a version under work). Returns what it did."""
    entries = read_lock(lock)
    recorded = dict(entries)
    if version in recorded:
        if recorded[version] == digest:
            return f"version {version} is already recorded with this content"
        if fixed is None or version in dict(fixed):
            raise SystemExit(f"charts/cai changed since version {version} was recorded: bump `version` in Chart.yaml, then run `{COMMAND}` again")
        entries = [e for e in entries if e[0] != version]
        recorded = dict(entries)
    if digest in recorded.values():
        same = next(v for v, d in entries if d == digest)
        raise SystemExit(f"version {version} has the same content as {same}: nothing changed, keep `version: {same}`")
    entries.append((version, digest))
    entries.sort(key=lambda e: version_key(e[0]))
    lock.write_text(HEADER + "".join(f"{v} sha256:{d}\n" for v, d in entries), encoding="utf-8")
    return f"recorded {version} sha256:{digest} in {lock.relative_to(REPO) if lock.is_relative_to(REPO) else lock}"


def main(argv: list[str]) -> int:
    args = argv[1:]
    if args == ["--check"]:
        why = problem(*current(), read_lock(), committed())
        if why:
            print(why, file=sys.stderr)
            return 1
        return 0
    if len(args) == 2 and args[0] == "--at":
        print(record(*at_commit(args[1]), fixed=committed()))
        return 0
    if args:
        print(__doc__, file=sys.stderr)
        return 2
    version, digest = current()
    newest = max((v for v, _ in read_lock()), key=version_key, default=None)
    if newest and version not in dict(read_lock()) and version_key(version) < version_key(newest):
        raise SystemExit(f"version {version} is older than {newest}, the newest recorded: bump `version` in Chart.yaml past it")
    print(record(version, digest, fixed=committed()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
