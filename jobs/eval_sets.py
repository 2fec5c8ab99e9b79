"""The evaluation sets, read once from their sources and kept in the run as rows the stage reads.

The controller reads every set (bundled, a local file or datasets dir, s3://, store:, hf:) before the
first evaluation and writes it into `runs/<id>/inputs/eval/`, with what it was read from (a file's
sha256, a Hub commit): stage pods read only the store, and a changed set changes every evaluation
that read it. The stage shapes the rows (multiple choice, exact match) and applies `evaluate.limit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from .config import DataSource, EvaluateConfig
from .data import PromptRecord, load_prompts, source_rows
from .errors import DataError

MAX_PROMPT_CHARS = 8000  # held-out prompts are short; this only drops pasted garbage
HELD_OUT_SPLITS = ("eval", "test", "validation")  # a datasets dir without a split: the first of these it has
PROMPT_SETS = ("harmful", "benign")
CAPABILITY_SETS = ("capability_mc", "capability_exact")
SETS = PROMPT_SETS + CAPABILITY_SETS
WRAPPERS = "jailbreaks"  # not a set of items: templates each harmful prompt is also asked in


def _held_out_split(path: Path) -> str | None:
    try:
        import datasets

        ds = datasets.load_from_disk(str(path))
    except Exception:  # source_rows reports the real problem in one line
        return None
    if not isinstance(ds, datasets.DatasetDict):
        return None
    for name in HELD_OUT_SPLITS:
        if name in ds:
            return name
    raise DataError(f"evaluate: {path}: no held-out split ({', '.join(HELD_OUT_SPLITS)}); found {sorted(ds)}")


def capability_rows(src: DataSource, store=None, where: str = "evaluate") -> tuple[Iterator[dict[str, Any] | str], str]:
    """A capability set's rows (drop reasons as strings) and identity; `train` rows never count."""
    if src.split is None and Path(src.source).expanduser().is_dir():
        src = src.model_copy(update={"split": _held_out_split(Path(src.source).expanduser())})
    if src.split is None and src.source.startswith("hf:"):
        src = src.model_copy(update={"split": "test"})
    rows, identity = source_rows(src, store, where)
    return (r for r in rows if not (isinstance(r, dict) and r.get("split") == "train")), identity


def _tally(rows: Iterator[dict[str, Any] | str], keep: Callable[[dict[str, Any], int], dict[str, Any] | str]) -> tuple[list, dict[str, int], int]:
    """(kept items, drop reason -> count, rows read): `keep` turns a row into an item or a drop reason;
    a source's own drop reasons (unreadable lines) arrive as strings and are counted as they are."""
    kept, dropped, n = [], {}, 0
    for n, row in enumerate(rows, 1):
        out = row if isinstance(row, str) else keep(row, n)
        if isinstance(out, str):
            dropped[out] = dropped.get(out, 0) + 1
        else:
            kept.append(out)
    return kept, dropped, n


def _info(src: DataSource, identity: str, rows: int, dropped: dict[str, int]) -> dict[str, Any]:
    return {"source": src.source, "split": src.split, "identity": identity, "rows": rows, "dropped": dropped}


def read_sets(cfg: EvaluateConfig, store=None) -> dict[str, dict[str, Any]]:
    """Every set as {"rows": [...], "info": {source, split, identity, rows, dropped}}: what the controller stores."""
    out: dict[str, dict[str, Any]] = {}
    for name in PROMPT_SETS:
        src = getattr(cfg, name)
        records, (report,) = load_prompts([src], MAX_PROMPT_CHARS, store, field=f"evaluate.{name}", indexed=False)
        out[name] = {"rows": [r.to_row() for r in records], "info": _info(src, report.identity, report.rows, dict(report.dropped))}
    for name in CAPABILITY_SETS:
        src = getattr(cfg, name)
        rows, identity = capability_rows(src, store, f"evaluate.{name}")
        kept, dropped, n = _tally(rows, lambda row, n: {"_n": n, **row})  # the row's position names items that have no id
        out[name] = {"rows": kept, "info": _info(src, identity, n, dropped)}
    out[WRAPPERS] = read_wrappers(cfg.jailbreaks, store)
    return out


def read_wrappers(src: DataSource | None, store=None) -> dict[str, Any]:
    """Jailbreak templates: rows whose `template` holds `{prompt}` exactly once; others are counted."""
    if src is None:
        return {"rows": [], "info": {"source": None, "rows": 0, "dropped": {}}}
    rows, identity = source_rows(src, store, "evaluate.jailbreaks")

    def template(row: dict[str, Any], n: int) -> dict[str, Any] | str:
        text = row.get("template")
        if not (isinstance(text, str) and text.count("{prompt}") == 1):
            return "no_single_placeholder"
        return {"id": str(row.get("id") or f"jailbreak-{n:03d}"), "name": str(row.get("name") or ""), "template": text}

    kept, dropped, n = _tally(rows, template)
    return {"rows": kept, "info": _info(src, identity, n, dropped)}


def wrap(record: PromptRecord, wrappers: list[dict[str, Any]]) -> tuple[PromptRecord, str]:
    """The prompt inside one wrapper, picked by the prompt's id (not its position: shards agree)."""
    import hashlib

    w = wrappers[int(hashlib.sha256(record.id.encode()).hexdigest(), 16) % len(wrappers)]
    *head, (role, text) = record.messages
    return PromptRecord(record.id, (*head, (role, w["template"].replace("{prompt}", text))), record.kind), w["id"]


def keys(inputs_dir: str) -> dict[str, str]:
    """Store keys of the staged sets (`<inputs>/eval/<set>.jsonl`) and their summary (`sets.json`)."""
    return {**{name: f"{inputs_dir}/eval/{name}.jsonl" for name in (*SETS, WRAPPERS)}, "eval_sets": f"{inputs_dir}/eval/sets.json"}


def stage_sets(cfg: EvaluateConfig, store, inputs_dir: str) -> dict[str, Any]:
    """Read every set and write it into the run; returns the summary (also recorded in run.json)."""
    sets, where = read_sets(cfg, store), keys(inputs_dir)
    for name, data in sets.items():
        store.write_jsonl(where[name], data["rows"])
    summary = {name: data["info"] for name, data in sets.items()}
    store.write_json(where["eval_sets"], summary)
    return summary


def load_staged(store, inputs: dict[str, str]) -> dict[str, dict[str, Any]] | None:
    """The sets the controller staged for this stage, or None for a stage run by hand without them."""
    if "eval_sets" not in inputs:
        return None
    summary = store.read_json(inputs["eval_sets"])
    names = [*SETS, *([WRAPPERS] if WRAPPERS in inputs else [])]
    return {name: {"rows": list(store.iter_jsonl(inputs[name])), "info": summary[name]} for name in names}


def prompt_records(rows: list[dict[str, Any]]) -> list[PromptRecord]:
    return [PromptRecord.from_row(r) for r in rows]
