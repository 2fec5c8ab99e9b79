"""Prompt loading: JSONL files, `datasets` datasets and the bundled sets, cleaned and counted.

Bad rows never crash a run: each is dropped and counted by reason, and the counts are reported.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import PromptSource
from .errors import DataError

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

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}

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


def iter_jsonl_rows(path: Path) -> Iterator[dict[str, Any] | str]:
    """Rows as dicts, or a drop reason string for lines that cannot become one."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh):
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


def iter_dataset_rows(ref: str, split: str | None) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{ref}: reading a datasets dataset needs `pip install datasets` (extra `train`)") from None
    try:
        if ref.startswith("hf:"):
            ds = datasets.load_dataset(ref[3:], split=split or "train")
        else:
            ds = datasets.load_from_disk(ref)
            if isinstance(ds, datasets.DatasetDict):
                if (split or "train") not in ds:
                    raise DataError(f"{ref}: split {(split or 'train')!r} not found; use one of {sorted(ds)}")
                ds = ds[split or "train"]
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{ref}: cannot load dataset ({first}); give a saved dataset directory or a cached hub name") from None
    yield from ds


def _rows(src: PromptSource) -> Iterator[dict[str, Any] | str]:
    ref = src.source
    if ref.startswith("bundled:"):
        name = ref.split(":", 1)[1]
        if name not in BUNDLED_SETS:
            raise DataError(f"{ref}: unknown bundled prompt set; use one of {', '.join('bundled:' + k for k in BUNDLED_SETS)}")
        rows, file_like = iter_jsonl_rows(DATA_DIR / BUNDLED_SETS[name]), True
    elif ref.startswith("hf:"):
        rows, file_like = iter_dataset_rows(ref, src.split), False
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            rows, file_like = iter_dataset_rows(str(path), src.split), False
        elif path.is_file():
            rows, file_like = iter_jsonl_rows(path), True
        else:
            raise DataError(f"{ref}: prompt source not found; give a JSONL file, a saved dataset dir, hf:<name> or bundled:<set>")
    for row in rows:
        # bundled/JSONL rows may carry their own split; datasets splits were selected on load
        if file_like and isinstance(row, dict) and src.split and "split" in row and row["split"] != src.split:
            continue
        yield row


def load_prompts(sources: Iterable[PromptSource], max_chars: int) -> tuple[list[PromptRecord], list[SourceReport]]:
    """All sources, in order, deduplicated across sources by conversation text."""
    records: list[PromptRecord] = []
    reports: list[SourceReport] = []
    seen_text: set[tuple] = set()
    seen_ids: set[str] = set()
    for src in sources:
        report = SourceReport(src.source)
        tag = Path(src.source.split(":", 1)[-1]).stem or "prompts"
        for n, row in enumerate(_rows(src), 1):
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
            if kind not in ("red-team", "ordinary"):
                kind = "ordinary"
            records.append(PromptRecord(pid, msgs, kind))
            report.kept += 1
        reports.append(report)
    return records, reports
