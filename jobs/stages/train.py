"""Stage `train`: SFT on the revisions, then DPO on the judged preferences with the SFT model as reference.

Methods: `sft+dpo` (default), `sft`, `dpo` (the start model is its own reference) and `reward` (a trl
RewardTrainer scoring model instead of a policy). With LoRA the adapters are merged at the end, so
every saved model is a plain checkpoint that `from_pretrained` loads without peft. A phase with no
rows is skipped and the reason recorded; if nothing trains, the start model is passed on unchanged.
Under a sharded strategy (FSDP, DeepSpeed ZeRO) each phase's model is gathered from its shards into a
plain directory, which the next phase loads and the stage saves.
What the rows are (which answer SFT learns, which pairs DPO keeps) is decided in `jobs.training_data`.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from ..config import LoraSection, StageSpec, TrainConfig
from ..distributed import barrier, is_main, node_scratch, share_with_every_node, sharded, strategy_args, world_size
from ..errors import CaiError, ConfigError
from ..models import resolve_model
from ..schema import parse_data
from ..store import ArtifactStore
from ..training_data import dpo_rows, judge_trusted, plan_phases, prompt_completion, sft_rows, summary
from . import StageResult, log


def _metrics_log(phase: str, rows: list[dict[str, Any]]):
    """A trainer callback: one metrics row per logged step under trl's own names, a progress line every
    ~5% of steps. Built on first use because torch, transformers and trl are imported inside the stage
    (inside its timer, as every stage imports its libraries), not when the CLI loads this module."""
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:  # the end-of-training summary carries train_loss instead
                return
            row = {"phase": phase, "step": state.global_step, "epoch": logs.get("epoch", state.epoch)}
            row.update({k: v for k, v in logs.items() if k != "epoch" and isinstance(v, (int, float))})
            rows.append(row)
            if state.global_step % max(1, state.max_steps // 20) == 0 or state.global_step == state.max_steps:
                extra = f", margin {logs['rewards/margins']:.4f}" if "rewards/margins" in logs else ""
                log("train", f"{phase} step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}{extra}, "
                    f"{progress(state.global_step, state.max_steps, time.perf_counter() - self.started)}")

    return MetricsLog()


def progress(step: int, total: int, elapsed_s: float) -> str:
    """'1.85 it/s, ETA 2m10s' from the steps done so far."""
    rate = step / elapsed_s if elapsed_s > 0 else 0.0
    left = (total - step) / rate if rate else 0.0
    eta = f"{int(left // 60)}m{int(left % 60):02d}s" if left >= 60 else f"{left:.0f}s"
    return f"{rate:.2f} it/s, ETA {eta}"


def _device_args() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    # GPU: bf16 mixed precision and trl's default gradient checkpointing. CPU: fp32 (trl needs use_cpu=True,
    # bf16=False there) and no checkpointing: the models that fit a CPU run fit its memory, and
    # recomputing activations would cost ~30% more time.
    return {"use_cpu": not cuda, "bf16": cuda, "gradient_checkpointing": cuda}


def _args(cls, phase: str, section, work: Path, seed: int, distributed=None, report_to: list[str] | None = None,
          run_name: str | None = None, **extra):
    # under torchrun each process takes its share of the batch: the global batch is the configured one
    if section.batch_size % world_size():
        raise ConfigError(f"train.{phase}.batch_size: {section.batch_size} does not split over {world_size()} processes "
                          f"(nodes x processes per node); make it a multiple of {world_size()}")
    layout = strategy_args(distributed) if distributed is not None else {}
    device = _device_args()
    if "deepspeed" in layout:
        if device["use_cpu"]:  # accelerate turns DeepSpeed off under use_cpu, after ZeRO-3 loading began
            raise ConfigError("train.distributed.strategy: deepspeed needs GPUs: accelerate runs DeepSpeed only on accelerators, "
                              "not on CPU processes; use strategy ddp on CPU")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("train.distributed.strategy: deepspeed is not installed in this image; install cai-jobs[deepspeed] "
                              "in the train image, or use strategy fsdp")
    try:
        return cls(
            output_dir=str(work / phase), num_train_epochs=section.epochs, learning_rate=section.learning_rate,
            per_device_train_batch_size=section.batch_size // world_size(),
            gradient_accumulation_steps=getattr(section, "gradient_accumulation_steps", 1),
            max_length=section.max_length, seed=seed, data_seed=seed, logging_steps=1, save_strategy="no",
            eval_strategy="no", report_to=list(report_to) if report_to else "none", run_name=run_name,
            disable_tqdm=True, **{**device, **layout, **extra},
        )
    except ImportError as e:  # installed but not importable with this torch (a version mismatch)
        if "deepspeed" not in str(e).lower():
            raise
        raise ConfigError(f"train.distributed.strategy: deepspeed does not import ({str(e).splitlines()[0]}); rebuild the train "
                          "image with cai-jobs[deepspeed] against its torch") from e


def _check_strategy(trainer, strategy: str) -> None:
    """A sharded strategy that accelerate did not turn on would silently train a whole copy per process."""
    took = {"ddp": True, "fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled}[strategy]
    if not took:
        raise ConfigError(f"train.distributed.strategy: {strategy} did not take effect on {trainer.args.device}: accelerate "
                          "shards a model only on GPUs and other accelerators, not on CPU processes; use strategy ddp on CPU")


def _gather(trainer, path: Path, every_node: bool = False) -> Path:
    """Every process: the sharded weights gathered into one plain HF directory (weights, config, tokenizer),
    written by rank 0, and with `every_node` copied to each other node's scratch (the gathered state dict
    exists on rank 0 alone); returns once every process that needs it can read it."""
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
    trainer.save_model(str(path))
    if is_main():
        (path / "training_args.bin").unlink(missing_ok=True)  # a pickle of the trainer's arguments: not part of the model
    barrier()
    if every_node:
        share_with_every_node(path)
    return path


def _free(trainer) -> None:
    """Release a finished sharded trainer's shards and optimizer state before the next phase loads its models."""
    import gc

    import torch

    trainer.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _lora(cfg: LoraSection, task_type: str):
    if not cfg.enabled:
        return None
    from peft import LoraConfig

    # SEQ_CLS makes peft train the new score head in full (modules_to_save); the merge keeps it.
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules, task_type=task_type)


def _load_lm(path: str | Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32 master weights; bf16 is autocast


def _save(model, tok, path: Path, record: dict[str, Any] | None = None) -> None:
    model.config.use_cache = True  # trainers turn it off for checkpointing; generation wants it back
    model.save_pretrained(path)
    tok.save_pretrained(path)  # tokenizer files + chat_template.jinja
    if record is not None:
        (path / "cai_train.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _card(spec: StageSpec, store: ArtifactStore, cfg: TrainConfig, counts: dict[str, Any]) -> str:
    """The model card (README.md) saved with the model: its lineage, constitution, data and settings."""
    import yaml

    from ..model_card import train_card

    ckey = spec.inputs.get("constitution")
    constitution = yaml.safe_load(store.read_text(ckey)) if ckey else None
    identity = spec.identities.get("model") or (store.digest(spec.inputs["model"]) if "model" in spec.inputs else None)
    data = {name: store.sha256(key) for name, key in spec.inputs.items() if name in ("traces", "prefs", "judge_summary")}
    section = {"sft": cfg.sft, "dpo": cfg.dpo, "reward": cfg.reward}
    settings = {p: section[p].model_dump(mode="json") for p in counts.get("phases_run", []) if p in section}
    if cfg.lora.enabled:
        settings["lora"] = cfg.lora.model_dump(mode="json")
    return train_card(run_id=spec.run_id, round_=spec.round, output=f"{spec.output}/model",
                      start_model=spec.model, start_identity=identity, constitution=constitution,
                      constitution_sha256=store.sha256(ckey) if ckey else None, data=data, method=cfg.method,
                      settings={**settings, "seed": spec.seed, "min_judge_consistency": cfg.min_judge_consistency}, counts=counts)


def _fit(phase: str, trainer, metrics: list[dict[str, Any]], counts: dict[str, Any], timings: dict[str, float]):
    """Train, record final losses, throughput and time; return the plain (LoRA-merged) model."""
    n, epochs = len(trainer.train_dataset), trainer.args.num_train_epochs
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its raw loss dicts: our progress lines and metrics.jsonl say it better
    log("train", f"{phase}: start, {n} rows x {epochs:g} epochs on {trainer.args.device}")
    t = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t
    mine = [r for r in metrics if r["phase"] == phase]
    # trl counts the tokens it trains on (`num_tokens`, cumulative); else: dataset tokens x epochs
    tokens = int(mine[-1].get("num_tokens", 0)) if mine else 0
    if not tokens:
        ds = trainer.train_dataset
        tokens = int(sum(len(x) for c in ds.column_names if c.endswith("ids") for x in ds[c]) * epochs)
    counts.update({f"{phase}_final_loss": mine[-1]["loss"] if mine else None, f"{phase}_train_loss": result.training_loss,
                   f"{phase}_steps": result.global_step, f"{phase}_tokens": tokens})
    if phase == "dpo" and mine:
        counts.update({f"dpo_final_{k.split('/')[1]}": mine[-1][k] for k in ("rewards/margins", "rewards/accuracies") if k in mine[-1]})
    counts[f"{phase}_tokens_per_s"] = round(tokens / seconds, 1) if seconds else 0.0
    timings[f"{phase}_s"] = seconds
    log("train", f"{phase}: done in {seconds:.1f}s, {result.global_step} steps, train loss {result.training_loss:.4f}, "
        f"{counts[f'{phase}_tokens_per_s']:.0f} tok/s")
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model  # LoRA: a plain checkpoint


def run(spec: StageSpec, store: ArtifactStore, engine=None) -> StageResult:
    del engine  # training loads its own model; engines are for generation
    cfg = parse_data(TrainConfig, spec.params, f"{spec.spec_key}:params")
    traces = list(store.iter_jsonl(spec.inputs["traces"])) if "traces" in spec.inputs else []
    prefs = list(store.iter_jsonl(spec.inputs["prefs"])) if "prefs" in spec.inputs else []
    judge_summary = store.read_json(spec.inputs["judge_summary"]) if "judge_summary" in spec.inputs else None
    trusted, why_trusted = judge_trusted(judge_summary, cfg.min_judge_consistency) if prefs else (True, "no preferences")
    sft_data = sft_rows(traces, cfg.sft.ordinary_target, spec.seed, cfg.sft.red_team_target)
    pref_data = dpo_rows(prefs, spec.seed, judged=trusted)
    phases, skipped = plan_phases(cfg.method, cfg.sft.enabled, cfg.dpo.enabled, len(sft_data), len(pref_data))
    counts: dict[str, Any] = {
        "method": cfg.method, "lora": cfg.lora.enabled, "sft_rows": len(sft_data), "dpo_rows": len(pref_data),
        **summary(traces, prefs, cfg.sft.ordinary_target, cfg.sft.red_team_target, trusted),
        "judge_trusted": trusted, "judge_trust": why_trusted, "phases_run": phases, "phases_skipped": skipped,
    }
    log("train", f"method {cfg.method}{' (LoRA, merged at the end)' if cfg.lora.enabled else ''}, model {spec.model}: "
        f"{len(sft_data)} SFT rows, {len(pref_data)} preference rows; phases {', '.join(phases) or 'none'}")
    if prefs:
        log("train", why_trusted)
    for phase, why in skipped.items():
        log("train", f"{phase}: skipped: {why}")

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    timings: dict[str, float] = {}
    metrics: list[dict[str, Any]] = []
    start = resolve_model(spec.model, store)
    set_seed(spec.seed)
    tok = AutoTokenizer.from_pretrained(start)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    def track(phase: str) -> dict[str, Any]:
        return {"report_to": cfg.report_to, "run_name": f"{spec.run_id}-round{spec.round}-{phase}"}

    tracked: list[str] = []
    layout, shard = cfg.distributed, sharded(cfg.distributed)
    with node_scratch("cai-train-", shared=shard) as work:
        # `final`: under a sharded strategy, the trainer whose shards hold the stage's model (gathered at the end)
        model, ref_dir, final = None, start, None
        own_reference = cfg.lora.enabled or cfg.dpo.precompute_ref_log_probs  # no second model in memory
        if "sft" in phases:
            args = _args(SFTConfig, "sft", cfg.sft, work, spec.seed, layout, **track("sft"), completion_only_loss=True)
            # prompt/completion rows: the loss covers the assistant answer only, whatever the chat template
            ds = Dataset.from_list([prompt_completion(r) for r in sft_data])
            trainer = SFTTrainer(model=_load_lm(start), args=args, train_dataset=ds, processing_class=tok,
                                 peft_config=_lora(cfg.lora, "CAUSAL_LM"), callbacks=[_metrics_log("sft", metrics)])
            _check_strategy(trainer, layout.strategy)
            model = _fit("sft", trainer, metrics, counts, timings)
            counts["sft_loss_on"] = "assistant answer (prompt/completion)"
            if shard and "dpo" in phases:  # DPO starts from (and is referenced to) the gathered SFT model
                ref_dir, model = _gather(trainer, work / "sft-model", every_node=True), None
                _free(trainer)
                del trainer
            elif shard:
                final = trainer
            elif "dpo" in phases and not own_reference:  # the reference is the SFT model, loaded from disk as its own copy
                ref_dir = work / "sft-model"
                _save(model, tok, ref_dir, {"phase": "sft"})
        if "dpo" in phases:
            # The reference is the model DPO starts from. LoRA: trl scores it with the adapters disabled.
            # precompute_ref_log_probs: trl scores every pair with the untrained model once, before step 1.
            # Either way no second copy is loaded; otherwise the reference is loaded as its own copy.
            # the arguments first: under ZeRO-3 they make every model below load already partitioned
            args = _args(DPOConfig, "dpo", cfg.dpo, work, spec.seed, layout, **track("dpo"), beta=cfg.dpo.beta,
                         loss_type=list(cfg.dpo.loss_type), loss_weights=cfg.dpo.loss_weights,
                         precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs)
            ref = None if own_reference else _load_lm(ref_dir)
            trainer = DPOTrainer(model=model if model is not None else _load_lm(ref_dir), ref_model=ref, args=args,
                                 train_dataset=Dataset.from_list(pref_data), processing_class=tok,
                                 peft_config=_lora(cfg.lora, "CAUSAL_LM"), callbacks=[_metrics_log("dpo", metrics)])
            _check_strategy(trainer, layout.strategy)
            model = _fit("dpo", trainer, metrics, counts, timings)
            counts["dpo_reference"] = ("sft model" if "sft" in phases else "start model") + (
                ", log-probs precomputed" if cfg.dpo.precompute_ref_log_probs else "")
            final = trainer if shard else None
            del ref, trainer
        if "reward" in phases:
            set_seed(spec.seed)  # the new score head is random-initialised
            args = _args(RewardConfig, "reward", cfg.reward, work, spec.seed, layout, **track("reward"))  # before loading (ZeRO-3)
            rm = AutoModelForSequenceClassification.from_pretrained(start, num_labels=1, dtype=torch.float32)
            rm.config.pad_token_id = tok.pad_token_id  # the score is read at the last non-pad token
            trainer = RewardTrainer(model=rm, args=args,
                                    train_dataset=Dataset.from_list(pref_data), processing_class=tok,
                                    peft_config=_lora(cfg.lora, "SEQ_CLS"), callbacks=[_metrics_log("reward", metrics)])
            _check_strategy(trainer, layout.strategy)
            model = _fit("reward", trainer, metrics, counts, timings)
            final = trainer if shard else None
            counts["model_kind"] = "reward model (AutoModelForSequenceClassification, num_labels=1): for scoring, not generation"
        if model is None:  # nothing to train: pass the start model on so later stages still find one
            model = _load_lm(start)
            counts["model_unchanged"] = True
        counts.setdefault("model_kind", "policy (AutoModelForCausalLM)")
        t = time.perf_counter()
        out_dir = work / "model"
        if final is not None:  # every process takes part in gathering the shards
            _gather(final, out_dir)
            del final
        if not is_main():  # every process holds the same weights; rank 0 alone writes them and the manifest
            return StageResult(outputs=[], counts=counts, timings=timings)
        counts["processes"] = world_size()
        counts["strategy"] = layout.strategy
        record = {"start_model": spec.model, "seed": spec.seed, "config": cfg.model_dump(mode="json"),
                  "phases_run": phases, "phases_skipped": skipped}
        if out_dir.is_dir():  # gathered: the weights, config and tokenizer are there; add the record
            (out_dir / "cai_train.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        else:
            _save(model, tok, out_dir, record)
        try:
            card = _card(spec, store, cfg, counts)
        except CaiError as e:  # the weights are what matters: a card that cannot read its inputs says so
            card = f"# {spec.run_id}, round {spec.round}\n\nThe model card could not be written ({str(e).splitlines()[0]}).\n"
        (out_dir / "README.md").write_text(card)
        store.put_dir(out_dir, f"{spec.output}/model")
        for phase in phases:  # transformers' TensorBoardCallback writes under <output_dir>/runs/
            events = work / phase / "runs"
            if "tensorboard" in cfg.report_to and events.is_dir():
                store.put_dir(events, f"{spec.output}/tensorboard/{phase}")
                tracked += store.list(f"{spec.output}/tensorboard/{phase}")
        timings["save_s"] = time.perf_counter() - t

    metrics_key = f"{spec.output}/metrics.jsonl"
    store.write_jsonl(metrics_key, metrics)
    log("train", f"{len(metrics)} metric rows -> {store.uri_for(metrics_key)}; model -> {store.uri_for(spec.output + '/model')}")
    if tracked:
        log("train", f"tensorboard --logdir {store.uri_for(spec.output + '/tensorboard')}")
    return StageResult(outputs=[metrics_key, *store.list(f"{spec.output}/model"), *tracked], counts=counts, timings=timings)
