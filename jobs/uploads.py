"""`cai submit`: put the local files a run needs into its store, and point the config at them.

A controller pod cannot read the submitting machine's disk. Every reference in the config that names
a local path (a model directory, a prompt file, an evaluation set) is uploaded under a key named by
its content (`uploads/{models,data}/<digest>/<name>`) and rewritten to `store:<key>`: re-submitting unchanged files
uploads nothing and keeps the run id; an edited file is a new key, so a new run computes from it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from .config import DataSource, RunConfig
from .data import source_rows
from .errors import DataError
from .eval_sets import capability_rows
from .model_sources import model_kind, precheck
from .store import ArtifactStore, local_tree_digest

UPLOADS = "uploads"


def _is_local_data(ref: str) -> bool:
    return ":" not in ref.split("/")[0] and Path(ref).expanduser().exists()


def _upload_dir(store: ArtifactStore | None, path: Path, kind: str, where: str) -> str:
    """A directory under `uploads/<kind>/<digest>/<name>`, sent only when the store does not hold those bytes."""
    digest = local_tree_digest(path)
    key = f"{UPLOADS}/{kind}/{digest.split(':', 1)[1][:16]}/{path.resolve().name}"
    if store is not None and store.digest(key) != digest:
        print(f"[cai] {where}: uploading {path} to {store.uri_for(key)}", file=sys.stderr, flush=True)
        store.put_dir(path, key)
    return f"store:{key}"


def _upload_model(store: ArtifactStore | None, ref: str, where: str) -> str:
    precheck(ref, where)
    return _upload_dir(store, Path(ref).expanduser(), "models", where)


def _upload_data(store: ArtifactStore | None, src: DataSource, where: str, capability: bool) -> dict[str, Any]:
    """A JSONL file goes up as it is; a saved datasets dir as the JSONL of the split a run would read
    (for a capability set, its held-out split), then with `split: null`. The key keeps the file's own
    name, which is where prompt ids come from (`<stem>-00001`), so an upload draws the same principles."""
    path = Path(src.source).expanduser()
    update: dict[str, Any] = {}
    if path.is_dir():
        rows, _ = capability_rows(src) if capability else source_rows(src)
        try:
            data = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows if isinstance(row, dict)).encode()
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        update["split"] = None
        name = f"{path.resolve().name}.jsonl"
    else:
        data, name = path.read_bytes(), path.name
    key = f"{UPLOADS}/data/{hashlib.sha256(data).hexdigest()[:16]}/{name}"
    if store is not None and not store.exists(key):
        print(f"[cai] {where}: uploading {src.source} to {store.uri_for(key)}", file=sys.stderr, flush=True)
        store.write_bytes(key, data)
    return {**update, "source": f"store:{key}"}


def upload_local_inputs(config: RunConfig, store: ArtifactStore | None) -> tuple[RunConfig, list[str]]:
    """The config with every local path replaced by its uploaded `store:` copy, and what was replaced.
    With no store, nothing is written: the keys alone (what `cai render --controller` shows)."""
    data = config.model_dump(mode="json")
    done: list[str] = []
    ev = data["evaluate"]
    models = [("model", data, "model"), ("judge.model", data["judge"], "model"), ("evaluate.judge_model", ev, "judge_model")]
    models += [("evaluate.classifier.model", ev["classifier"], "model")] if ev.get("classifier") else []
    models += [("evaluate.depth_probe.base_model", ev["depth_probe"], "base_model")] if ev.get("depth_probe") else []
    for where, holder, field in models:
        ref = holder.get(field)
        if ref and model_kind(ref) == "local":
            holder[field] = _upload_model(store, ref, where)
            done.append(f"{where}: {ref}")
    sources = [(f"data.train[{i}]", s, False) for i, s in enumerate(data["data"]["train"])]
    sources += [(f"evaluate.{k}", data["evaluate"][k], k.startswith("capability")) for k in ("harmful", "benign", "capability_mc", "capability_exact")]
    for where, src, capability in sources:
        if _is_local_data(src["source"]):
            ref = src["source"]
            src.update(_upload_data(store, DataSource.model_validate({k: src.get(k) for k in DataSource.model_fields}), where, capability))
            done.append(f"{where}: {ref}")
    harness = ev.get("harness") or {}
    tasks = harness.get("include_path")
    if tasks and _is_local_data(tasks):  # lm-eval task files: a directory, uploaded whole
        harness["include_path"] = _upload_dir(store, Path(tasks).expanduser(), "harness", "evaluate.harness.include_path")
        done.append(f"evaluate.harness.include_path: {tasks}")
    return RunConfig.model_validate(data), done
