"""Prompt loading: JSONL files, `datasets` datasets and the bundled sets, cleaned and counted.

Bad rows never crash a run: each is dropped and counted by reason, and the counts are reported.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import DataSource, PromptSource
from .errors import CaiError, DataError
from .store import local_tree_digest

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_SETS = {
    "red-team": "red_team.jsonl",
    "helpful": "helpful.jsonl",
    "borderline": "borderline.jsonl",
}


@dataclass(frozen=True)
class PromptRecord:
    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content), ending with a user turn
    kind: str

    @property
    def conversation(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def text(self) -> str:
        return self.messages[-1][1]

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "messages": self.conversation}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "PromptRecord":
        return cls(row["id"], tuple((m["role"], m["content"]) for m in row["messages"]), row["kind"])


@dataclass
class SourceReport:
    source: str
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    identity: str = ""  # the content it was read from: a file's sha256 or a Hub commit

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "identity": self.identity, "rows": self.rows, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none dropped"
        return f"{self.source}: {self.kept}/{self.rows} prompts kept ({drops})"


def _messages_from(row: dict[str, Any], column: str) -> tuple[tuple[str, str], ...] | str:
    """The row's conversation, or a drop reason."""
    if "messages" in row and column == "prompt" and "prompt" not in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "bad_messages"
        out = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
                return "bad_messages"
            out.append((m["role"], m["content"]))
        while out and out[-1][0] == "assistant":  # a finished chat: regenerate its last reply
            out.pop()
        if not out or out[-1][0] != "user":
            return "bad_messages"
        return tuple(out) if out[-1][1].strip() else "empty"
    value = row.get(column)
    if value is None:
        return "no_prompt"
    if not isinstance(value, str):
        return "bad_messages"
    if not value.strip():
        return "empty"
    return (("user", value.strip()),)


def jsonl_rows(lines: Iterable[bytes]) -> Iterator[dict[str, Any] | str]:
    """Rows as dicts, or a drop reason string for lines that cannot become one."""
    for n, raw in enumerate(lines):
        if n == 0 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM from some Windows editors
            raw = raw[3:]
        if not raw.strip():
            yield "empty"
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield "non_utf8"
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            yield "invalid_json"
            continue
        yield row if isinstance(row, dict) else "invalid_json"


def iter_jsonl_rows(path: Path) -> Iterator[dict[str, Any] | str]:
    with open(path, "rb") as fh:
        yield from jsonl_rows(fh)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading a `datasets` dataset needs `pip install datasets` (extra `train`)") from None
    return datasets


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def iter_dataset_rows(ref: str, split: str | None, where: str = "data") -> Iterator[dict[str, Any]]:
    """A dataset saved with `save_to_disk` (a Dataset or a DatasetDict)."""
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(ref)
        if isinstance(ds, datasets.DatasetDict):
            if (split or "train") not in ds:
                raise DataError(f"{where}: {ref}: split {(split or 'train')!r} not found; use one of {sorted(ds)}")
            ds = ds[split or "train"]
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs one line
        raise DataError(f"{where}: {ref}: cannot load dataset ({_one_line(e)}); give a saved dataset directory, a JSONL file or hf:<org>/<name>") from None
    yield from ds


def hub_dataset(src: DataSource, where: str = "data") -> tuple[Any, str]:
    """(the `datasets` Dataset of an `hf:` source's split, the commit it resolved to). The repo comes
    through huggingface_hub at a pinned commit, then `datasets` reads the snapshot's files."""
    from .hub import parse_hub_ref, snapshot

    repo, at = parse_hub_ref(src.source, error=DataError, where=where)
    snap = snapshot(repo, src.revision or at, repo_type="dataset", error=DataError, where=where)
    datasets = _datasets()
    split = src.split or "train"
    try:
        ds = datasets.load_dataset(str(snap.path), name=src.config, split=split)
    except Exception as e:
        raise DataError(f"{where}: {src.source}@{snap.commit[:12]}: cannot load config {src.config!r} split {split!r} ({_one_line(e)}); "
                        "check config and split against the dataset card") from None
    return ds, snap.commit


def _source_bytes(src: DataSource, store, where: str) -> bytes | None:
    """The bytes of a source that is one JSONL file (bundled, local, s3:// or store:); None for a directory."""
    ref = src.source
    if ref.startswith("bundled:"):
        name = ref.split(":", 1)[1]
        path = DATA_DIR / (BUNDLED_SETS.get(name) or f"{name}.jsonl")
        if not path.is_file():
            names = sorted({*BUNDLED_SETS, *(p.stem for p in DATA_DIR.glob("capability_*.jsonl"))})
            raise DataError(f"{where}: {ref}: unknown bundled set; use one of {', '.join('bundled:' + k for k in names)}")
        return path.read_bytes()
    if ref.startswith(("s3://", "store:")):
        from .store import open_store

        if ref.startswith("store:"):
            if store is None:
                raise DataError(f"{where}: {ref}: a store: source needs the run's store")
            owner, key = store, ref.split(":", 1)[1]
        else:
            parent, _, key = ref.rstrip("/").rpartition("/")
            if not key or parent in ("s3:", "s3:/"):
                raise DataError(f"{where}: {ref}: expected s3://BUCKET/PATH/FILE.jsonl")
            owner = open_store(parent)
        try:
            return owner.read_bytes(key)
        except CaiError as e:
            raise DataError(f"{where}: {ref}: cannot read it ({_one_line(e)}); give a JSONL object that exists") from None
    path = Path(ref).expanduser()
    if path.is_dir():
        return None
    if not path.is_file():
        raise DataError(f"{where}: {ref}: source not found; give a JSONL file, a saved dataset dir, s3://..., store:<key>, hf:<org>/<name> or bundled:<set>")
    return path.read_bytes()


def source_rows(src: DataSource, store=None, where: str = "data") -> tuple[Iterator[dict[str, Any] | str], str]:
    """Rows of any source (drop reasons as strings) and its identity: a file's sha256, a directory's
    tree digest or a Hub commit. JSONL rows may carry their own `split`; datasets select it on load."""
    ref = src.source
    if ref.startswith("hf:"):
        ds, commit = hub_dataset(src, where)
        return iter(ds), f"hf:{ref[3:].split('@')[0]}@{commit}"
    data = _source_bytes(src, store, where)
    if data is None:  # a saved datasets directory
        path = Path(ref).expanduser()
        return iter_dataset_rows(str(path), src.split, where), local_tree_digest(path)
    rows = jsonl_rows(data.splitlines(keepends=True))
    if src.split:
        rows = (r for r in rows if not (isinstance(r, dict) and "split" in r and r["split"] != src.split))
    return rows, "sha256:" + hashlib.sha256(data).hexdigest()


def load_prompts(sources: Iterable[PromptSource], max_chars: int, store=None, field: str = "data.train",
                 indexed: bool = True) -> tuple[list[PromptRecord], list[SourceReport]]:
    """All sources, in order, deduplicated across sources by conversation text; errors name `field[i]`
    (`field` alone when not `indexed`: an evaluation set is one source)."""
    records: list[PromptRecord] = []
    reports: list[SourceReport] = []
    seen_text: set[tuple] = set()
    seen_ids: set[str] = set()
    for i, src in enumerate(sources):
        report = SourceReport(src.source)
        tag = Path(src.source.split(":", 1)[-1]).stem or "prompts"
        rows, report.identity = source_rows(src, store, f"{field}[{i}]" if indexed else field)
        for n, row in enumerate(rows, 1):
            report.rows += 1
            if src.limit is not None and report.kept >= src.limit:
                report.dropped["over_limit"] += 1
                continue
            if isinstance(row, str):
                report.dropped[row] += 1
                continue
            msgs = _messages_from(row, src.column)
            if isinstance(msgs, str):
                report.dropped[msgs] += 1
                continue
            if sum(len(c) for _, c in msgs) > max_chars:
                report.dropped["too_long"] += 1
                continue
            key = tuple((r, " ".join(c.split()).lower()) for r, c in msgs)
            if key in seen_text:
                report.dropped["duplicate"] += 1
                continue
            seen_text.add(key)
            pid = str(row.get("id") or f"{tag}-{n:05d}")
            while pid in seen_ids:
                pid += "+"
            seen_ids.add(pid)
            kind = src.kind or row.get("kind") or "ordinary"
            if kind not in ("red-team", "ordinary"):  # a typo would silently turn red-team prompts ordinary
                raise DataError(f"{f'{field}[{i}]' if indexed else field}: {src.source}: row {n}: kind {kind!r} is not "
                                "`red-team` or `ordinary`; fix the row, or set `kind` on the source to override every row")
            records.append(PromptRecord(pid, msgs, kind))
            report.kept += 1
        reports.append(report)
    return records, reports
