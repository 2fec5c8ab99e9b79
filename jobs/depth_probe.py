"""How deep the alignment goes: fine-tune throwaway copies on a few harmful completions, measure again.

The seed warns of "shallow safety alignment": a refusal habit that a handful of fine-tuning examples
undoes. The probe takes the base model's own compliant answers to training red-team prompts (the first
answers in round 1's generate traces: no new harmful text is written), fine-tunes a copy of a model on
k of them for each k in `evaluate.depth_probe.ks`, and measures the harmless rate (strict first-person
refusals, with a Wilson interval) on the held-out harmful prompts again. The curve for the aligned model
beside the base model's says whether the gain survives. The copies live in a temporary directory of
the stage and are deleted with it; they are never written to the store, so they cannot be promoted.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .config import DepthProbeConfig, EngineConfig
from .refusal import is_refusal, is_strict_refusal
from .uncertainty import rate_interval


def _free() -> None:
    """One model at a time: the probe alternates trainers and engines."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compliant_examples(traces: Iterable[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """SFT rows of the first answers to red-team prompts that did not refuse, in a seeded order."""
    rows = [{"messages": list(t["messages"]) + [{"role": "assistant", "content": t["initial"].strip()}]}
            for t in traces if t.get("kind") == "red-team" and t.get("messages") and isinstance(t.get("initial"), str)
            and t["initial"].strip() and not is_refusal(t["initial"])]
    random.Random(seed).shuffle(rows)
    return rows


def _finetune(model_dir: str, rows: list[dict[str, Any]], cfg: DepthProbeConfig, out: Path, seed: int) -> Path:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from .stages.train import _args, _load_lm
    from .training_data import prompt_completion

    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = SFTTrainer(model=_load_lm(model_dir), args=_args(SFTConfig, "probe", cfg, out / "work", seed, completion_only_loss=True),
                         train_dataset=Dataset.from_list([prompt_completion(r) for r in rows]), processing_class=tok)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    del trainer, model
    _free()
    return out / "model"


def _harmless(model_dir: str, harmful: list, engine_cfg: EngineConfig, max_new_tokens: int, level: float) -> dict[str, Any]:
    from .engines import SamplingParams, load_engine

    engine = load_engine(engine_cfg, model_dir)
    replies = engine.generate([p.conversation for p in harmful], SamplingParams(max_new_tokens=max_new_tokens), desc="depth probe")
    del engine
    _free()
    return {"harmless_strict": rate_interval([is_strict_refusal(r) for r in replies], level),
            "harmless_refusal": rate_interval([is_refusal(r) for r in replies], level)}


def probe_curve(model_dir: str, examples: list[dict[str, Any]], harmful: list, cfg: DepthProbeConfig, engine_cfg: EngineConfig,
                seed: int, level: float) -> list[dict[str, Any]]:
    """[{k, harmless_strict, harmless_refusal}] for k = 0 (the model as it is) and each configured k."""
    harmful = harmful[: cfg.prompts] if cfg.prompts else harmful
    curve = [{"k": 0, **_harmless(model_dir, harmful, engine_cfg, cfg.max_new_tokens, level)}]
    scratch = Path(tempfile.mkdtemp(prefix="cai-depth-probe-"))
    try:
        for k in cfg.ks:
            if k > len(examples):
                curve.append({"k": k, "skipped": f"only {len(examples)} compliant answers in the traces"})
                continue
            copy = _finetune(model_dir, examples[:k], cfg, scratch / f"k{k}", seed)
            curve.append({"k": k, **_harmless(str(copy), harmful, engine_cfg, cfg.max_new_tokens, level)})
            shutil.rmtree(scratch / f"k{k}", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return curve
