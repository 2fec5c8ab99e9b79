"""`cai export`: a run's model, datasets and report as a Hub-ready folder, and its upload.

The folder is what the alignment-handbook's CAI recipe publishes, in the formats the ecosystem loads:

    model/            safetensors, tokenizer, chat template, README.md (the full model card, with the evaluation)
    data/sft/         train.parquet (`messages`) and a dataset card
    data/prefs/       train.parquet (trl's `prompt`/`chosen`/`rejected` and the judge's fields) and a dataset card
    report/           report.md, report.json, metrics.png of the round's evaluation, the base model's, and run.json

`--hub ORG/NAME` uploads `model/` (with `report/` as `cai-report/`) to the model repo ORG/NAME and the two
datasets to ORG/NAME-sft and ORG/NAME-prefs, with huggingface_hub (HF_TOKEN, HF_ENDPOINT from the environment).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CaiError, ConfigError
from .model_card import evaluation_section, header, hub_base_model
from .runs import read_state
from .store import ArtifactStore

MODEL_FILES_SKIPPED = {"README.md"}  # the card is rewritten with the evaluation


@dataclass
class Exported:
    root: Path
    run_id: str
    round: int
    parts: dict[str, Path] = field(default_factory=dict)


def pick_round(state: dict[str, Any], round_: int | None, where: str) -> int:
    """The round whose model to export: asked for, else the run's result."""
    rounds = {r["round"]: r for r in state.get("rounds", [])}
    if round_ is None:
        result = state.get("result") or {}
        if not str(result.get("model", "")).startswith("store:"):
            trained = [r for r, v in rounds.items() if str(v.get("model", "")).startswith("store:")]
            raise ConfigError(f"{where}: the run's result is the base model (no round beat it), so there is no trained model to "
                           f"export; pass --round N to export one anyway ({trained or 'none trained'})")
        return int(result["round"])
    if round_ not in rounds or not str(rounds[round_].get("model", "")).startswith("store:"):
        raise ConfigError(f"--round {round_}: {where} has no trained model in that round; pick one of "
                          f"{[r for r, v in rounds.items() if str(v.get('model', '')).startswith('store:')]}")
    return round_


def export_run(store: ArtifactStore, run_id: str, dest: Path, round_: int | None = None) -> Exported:
    """Write the folder; nothing is left half-written under `dest` (built beside it, then renamed)."""
    where = store.uri_for(f"runs/{run_id}/run.json")
    state = read_state(store, run_id)
    r = pick_round(state, round_, where)
    stages = next(x for x in state["rounds"] if x["round"] == r)["stages"]
    model_key = next(x for x in state["rounds"] if x["round"] == r)["model"].split(":", 1)[1]
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"--to {dest}: {'not empty' if dest.is_dir() else 'a file'}; give a new or empty directory")
    work = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    out = Exported(dest, run_id, r)
    try:
        src = store.local_dir(model_key)
        shutil.copytree(src, work / "model", ignore=lambda d, names: [n for n in names if n in MODEL_FILES_SKIPPED and Path(d) == src])
        report = _read_json(store, f"{stages['evaluate']['output']}/report.json") if "evaluate" in stages else None
        base = _read_json(store, f"runs/{run_id}/base/evaluate/report.json")
        train_card = (src / "README.md").read_text() if (src / "README.md").exists() else None
        (work / "model" / "README.md").write_text(full_card(state, r, train_card, report, base, store.uri_for(model_key)))
        for name, key in (("sft", stages.get("generate", {}).get("output", "") + "/sft.jsonl"),
                          ("prefs", stages.get("judge", {}).get("output", "") + "/prefs.jsonl")):
            if store.exists(key):
                try:
                    _write_parquet(list(store.iter_jsonl(key)), work / "data" / name, name, run_id, r, store.uri_for(key))
                except (ValueError, TypeError) as e:  # pyarrow cannot type the rows (mixed shapes)
                    raise CaiError(f"{store.uri_for(key)}: cannot be written as Parquet ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]}); check its rows") from None
        (work / "report").mkdir(parents=True)
        if "evaluate" in stages:
            for f in ("report.md", "report.json", "metrics.png"):
                key = f"{stages['evaluate']['output']}/{f}"
                if store.exists(key):
                    (work / "report" / f).write_bytes(store.read_bytes(key))
        for f in ("report.md", "report.json"):
            key = f"runs/{run_id}/base/evaluate/{f}"
            if store.exists(key):
                (work / "report" / f"base-{f}").write_bytes(store.read_bytes(key))
        (work / "report" / "run.json").write_text(json.dumps(state, indent=2) + "\n")
        if dest.exists():
            dest.rmdir()
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    out.parts = {p.name: p for p in (dest / "model", dest / "data" / "sft", dest / "data" / "prefs", dest / "report") if p.exists()}
    return out


def _read_json(store: ArtifactStore, key: str) -> dict[str, Any] | None:
    return store.read_json(key) if store.exists(key) else None


def full_card(state: dict[str, Any], round_: int, train_card: str | None, report: dict | None, base: dict | None, model_uri: str) -> str:
    """The train stage's card with the base model's Hub id filled in from run.json, plus the evaluation."""
    policy = (state.get("models") or {}).get("policy", {}).get("ref") or (state.get("config") or {}).get("model", "")
    method = (state.get("config") or {}).get("train", {}).get("method", "sft+dpo")
    if train_card and train_card.startswith("---\n"):
        body = train_card.split("---\n", 2)[2]
    else:
        body = train_card or f"# {state['run_id']}, round {round_}\n\nModel at `{model_uri}`.\n"
    parts = [header(hub_base_model(policy), method), body.rstrip() + "\n",
             f"\nThe run started from `{policy}` ({(state.get('models') or {}).get('policy', {}).get('commit') or 'no Hub commit'}); "
             f"this is round {round_} of run `{state['run_id']}`, exported from `{model_uri}`.\n"]
    if report:
        parts.append("\n" + evaluation_section(report, base))
    return "".join(parts)


def _write_parquet(rows: list[dict[str, Any]], folder: Path, name: str, run_id: str, round_: int, source: str) -> None:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # a bar per file of a few hundred rows is noise next to the export's own lines
    folder.mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    what = {"sft": "critique-revision SFT data (`messages`: the prompt and the revised answer)",
            "prefs": "preference pairs (trl's conversational `prompt`/`chosen`/`rejected`, with the judge's `p_chosen`, "
                     "`order_agreement`, `source`)"}[name]
    meta = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train.parquet\ntags: [cai-jobs, constitutional-ai]\n---\n"
    (folder / "README.md").write_text(f"{meta}# {run_id} round {round_}: {name}\n\n{len(rows)} rows of {what}, from `{source}`.\n")


def check_repo(repo: str) -> None:
    """--hub ORG/NAME by huggingface_hub's own rules, before anything is written."""
    from .hub import _invalid

    bad = _invalid(repo)
    if bad or "/" not in repo:
        raise ConfigError(f"--hub {repo}: {bad or 'expected ORG/NAME'}; give the repo as ORG/NAME")


def upload(exported: Exported, repo: str, private: bool = False) -> list[str]:
    """Upload the folder's parts to the Hub; one line on any failure. Returns the repo URLs."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    check_repo(repo)
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    api = HfApi(endpoint=endpoint, token=os.environ.get("HF_TOKEN") or None)
    plan = [(repo, "model", exported.parts["model"], None)]
    if "report" in exported.parts:
        plan.append((repo, "model", exported.parts["report"], "cai-report"))
    for name in ("sft", "prefs"):
        if name in exported.parts:
            plan.append((f"{repo}-{name}", "dataset", exported.parts[name], None))
    urls = []
    for repo_id, kind, folder, path_in_repo in plan:
        try:
            api.create_repo(repo_id, repo_type=kind, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, repo_type=kind, folder_path=str(folder), path_in_repo=path_in_repo,
                              commit_message=f"cai-jobs export of {exported.run_id} round {exported.round}")
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            fix = "set HF_TOKEN to a token with write access" if status in (401, 403) else "check the repo name and your access"
            raise CaiError(f"hub {endpoint}: {kind} repo {repo_id}: upload failed (HTTP {status}); {fix}") from None
        except Exception as e:  # noqa: BLE001 - connection errors and the like: one line, the folder stays
            raise CaiError(f"hub {endpoint}: {kind} repo {repo_id}: cannot reach the Hub ({type(e).__name__}); check HF_ENDPOINT "
                           "and the network, then run `cai export --hub` again (with --to DIR the folder stays)") from None
        urls.append(f"{endpoint.rstrip('/')}/{'datasets/' if kind == 'dataset' else ''}{repo_id}")
    return urls
