"""Capability through lm-evaluation-harness (the `eval` extra): the benchmarks users compare alignment tax on.

`evaluate.harness` runs lm-eval's Python API (`simple_evaluate`, the `hf` model) on the stage's model
directory: the standard tasks (mmlu, gsm8k, truthfulqa_mc2, hellaswag, ifeval...) fetch their data from
the Hub on a cluster, as lm-eval users expect; local tasks in lm-eval's own YAML format come from
`include_path`, which the controller copies into the run (`{task_dir}` in a task file stands for that
copy, so a task can name its local JSONL). Settings that change scores (few-shot, chat template, limit)
are recorded next to the results, and the base-vs-aligned table is the seed's: benchmark, base,
aligned, tax %, with the average.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from .config import EngineConfig, HarnessConfig
from .errors import ConfigError, DataError
from .uncertainty import wilson

PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "mc2", "f1", "prompt_level_strict_acc")
TASK_DIR = "{task_dir}"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("config: evaluate.harness: needs lm-evaluation-harness; run `pip install 'cai-jobs[eval]'`") from None
    return lm_eval, TaskManager


def materialise_tasks(src: Path, dest: Path) -> Path:
    """A copy of the task directory with `{task_dir}` in every YAML replaced by the copy's own path."""
    shutil.copytree(src, dest, dirs_exist_ok=True)
    for path in dest.rglob("*.y*ml"):
        text = path.read_text(encoding="utf-8")
        if TASK_DIR in text:
            path.write_text(text.replace(TASK_DIR, str(dest)), encoding="utf-8")
    return dest


def main_metric(task_result: dict[str, Any]) -> tuple[str, float] | None:
    """The task's headline metric (acc_norm before acc, ...; lm-eval keys are `<metric>,<filter>`)."""
    values: dict[str, tuple[str, float]] = {}
    for key, v in task_result.items():
        if "," in key and "_stderr" not in key and isinstance(v, (int, float)):
            name, filt = key.split(",", 1)
            values.setdefault(name, (key if filt != "none" else name, float(v)))  # gsm8k: the first filter, named
    for name in (*PREFERRED_METRICS, *sorted(values)):
        if name in values:
            return values[name]
    return None


def _device_dtype(engine: EngineConfig) -> tuple[str, str]:
    """`auto` as the engines read it: a GPU with bfloat16 when there is one, else the CPU in float32."""
    import torch

    device = engine.device if engine.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = engine.dtype if engine.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


def run_harness(model_dir: str, cfg: HarnessConfig, engine: EngineConfig, task_dir: Path | None, seed: int, level: float) -> dict[str, Any]:
    """{settings, results: {task: {metric, value, n, lo, hi, metrics}}} for one model directory."""
    lm_eval, TaskManager = _lm_eval()
    scratch = Path(tempfile.mkdtemp(prefix="cai-harness-"))
    try:
        manager = TaskManager(include_path=str(materialise_tasks(task_dir, scratch / "tasks"))) if task_dir else TaskManager()
        device, dtype = _device_dtype(engine)
        args = f"pretrained={model_dir},dtype={dtype},trust_remote_code={engine.trust_remote_code}"
        try:
            out = lm_eval.simple_evaluate(
                model="hf", model_args=args, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                batch_size=cfg.batch_size, device=device, apply_chat_template=cfg.apply_chat_template, task_manager=manager,
                log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (KeyError, ValueError) as e:  # an unknown task name, a task file that does not parse
            raise DataError(f"evaluate.harness: {' '.join(str(e).split())[:300]}; check the task names and include_path") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {}
    for task, res in (out or {}).get("results", {}).items():
        if task not in cfg.tasks:  # a group's subtasks: the group's own row stands for them (no double counting)
            continue
        picked = main_metric(res)
        if picked is None:
            continue
        n = int((out.get("n-samples", {}).get(task) or {}).get("effective") or res.get("sample_len") or 0)
        row = {"metric": picked[0], "value": picked[1], "n": n, "n_shot": (out.get("n-shot") or {}).get(task)}
        bounds = wilson(round(picked[1] * n), n, level) if n and 0.0 <= picked[1] <= 1.0 else None
        if bounds:
            row.update(lo=bounds[0], hi=bounds[1])
        results[task] = row
    settings = {"tasks": list(cfg.tasks), "num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "apply_chat_template": cfg.apply_chat_template,
                "include_path": cfg.include_path, "lm_eval_version": getattr(lm_eval, "__version__", None)}
    return {"settings": settings, "results": results}


def tax_rows(base: dict[str, Any] | None, aligned: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """{task: (base value, aligned value)} for the tax table; base may be missing a task."""
    base_results = (base or {}).get("results", {})
    return {t: ((base_results.get(t) or {}).get("value"), r["value"]) for t, r in aligned["results"].items()}
