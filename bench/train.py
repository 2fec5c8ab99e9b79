"""Benchmark: SFT and DPO training throughput of the `train` stage (trl), and on GPU an MFU estimate.

The stage itself does the work: `jobs.stages.train.run` on a throwaway local store, so the trainers are
built exactly as a run builds them (trl SFTTrainer on prompt/completion rows, then DPOTrainer with the
SFT model as its reference; fp32 on CPU, bf16 autocast + gradient checkpointing on GPU). Its tokens/s
are trl's own token count (non-padding tokens, chosen + rejected for DPO) over the wall time of
`trainer.train()`.

Baseline: SFT. `ratio` = DPO tokens/s / SFT tokens/s, measured in the same run. A DPO token costs the
policy's forward and backward (6N FLOPs) plus the reference's forward (2N), so with no waste the ratio
is about 6/8 = 0.75; far from it means one phase wastes work (or the run was disturbed). `--lora`
also runs the stage with LoRA adapters and reports LoRA vs full fine-tuning per phase.

MFU = model FLOPs per token x tokens/s / peak FLOP/s, with 6N per SFT token and 8N per DPO token
(full fine-tuning; LoRA skips weight gradients: 4N and 6N), N = all parameters (the tied embedding
counted once, as the output projection's matmul). Peak: from the GPU's name, or --peak-tflops.

    .venv/bin/python bench/train.py               # quick sizes (what `make bench` runs)
    .venv/bin/python bench/train.py --rows 64 --lora
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's `jobs` and `bench`
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BUNDLED_MODEL, RESULTS, OtherLoad, bench_prompts, command_line, finish_machine, format_table, log, machine_info,
    now_iso, print_report_header, ratio, write_json_atomic,
)

QUICK = {"rows": 32, "answer_tokens": 64, "sft_batch_size": 8, "dpo_batch_size": 4, "max_length": 384}
DEFAULT_OUT = RESULTS / "train.json"

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets. First match wins,
# so the specific names come before the generic ones.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops_for(device_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU from its name; None when unknown (CPUs, unlisted GPUs)."""
    if not device_name:
        return None
    name = device_name.upper()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(phase: str, params: int, lora: bool) -> float:
    """Model FLOPs per trained token: forward 2N, backward 4N (2N with frozen base weights), DPO reference 2N."""
    fwd_bwd = (4 if lora else 6) * params
    return fwd_bwd + (2 * params if phase == "dpo" else 0)


def mfu(tokens_per_s: float, flops_token: float, peak_tflops: float | None) -> float | None:
    return round(tokens_per_s * flops_token / (peak_tflops * 1e12), 6) if peak_tflops else None


def count_params(model_path: str) -> int:
    """Parameters of the model, counted on the meta device (no weights loaded); tied weights once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def training_inputs(records, answers: list[str]) -> tuple[list[dict], list[dict]]:
    """Traces (SFT learns each prompt's own answer) and preference rows (answer over a needless refusal).

    The shapes the generate and judge stages write, so the train stage reads them as in a run.
    """
    from jobs.stages.judge import NEEDLESS_REFUSALS

    traces, prefs = [], []
    for i, (rec, answer) in enumerate(zip(records, answers)):
        conv = rec.conversation
        traces.append({"id": rec.id, "kind": rec.kind, "messages": conv, "initial": answer, "rounds": [], "final": answer})
        prefs.append({"id": rec.id, "prompt": conv, "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": NEEDLESS_REFUSALS[i % len(NEEDLESS_REFUSALS)]}],
                      "source": "helpful"})
    return traces, prefs


def train_config(args, lora: bool):
    from jobs.config import DPOSection, LoraSection, SFTSection, TrainConfig

    return TrainConfig(
        method="sft+dpo",
        # every prompt's own answer is the target, red-team ones too: the bench measures speed, not what is taught
        sft=SFTSection(epochs=1, batch_size=args.sft_batch_size, max_length=args.max_length, red_team_target="final"),
        dpo=DPOSection(epochs=1, batch_size=args.dpo_batch_size, max_length=args.max_length),
        lora=LoraSection(enabled=lora),
    )


def run_train_stage(model_ref: str, traces: list[dict], prefs: list[dict], cfg, seed: int) -> dict[str, Any]:
    """The train stage on a throwaway local store; its counts and timings."""
    from jobs.config import StageSpec
    from jobs.stages import train
    from jobs.store import LocalStore

    with tempfile.TemporaryDirectory(prefix="cai-bench-train-") as tmp:
        store = LocalStore(tmp)
        inputs = {"traces": "runs/bench/round-1/generate/traces.jsonl", "prefs": "runs/bench/round-1/judge/prefs.jsonl"}
        store.write_jsonl(inputs["traces"], traces)
        store.write_jsonl(inputs["prefs"], prefs)
        spec = StageSpec(stage="train", run_id="bench", round=1, store=str(store.root), output="runs/bench/round-1/train",
                         model=model_ref, inputs=inputs, params=cfg.model_dump(mode="json"), seed=seed)
        result = train.run(spec, store)
    gc.collect()
    return {"counts": result.counts, "timings": result.timings}


def phase_figures(res: dict[str, Any], phase: str, params: int, lora: bool, peak: float | None) -> dict[str, Any]:
    c, t = res["counts"], res["timings"]
    tok_s = c.get(f"{phase}_tokens_per_s") or 0.0
    f_tok = flops_per_token(phase, params, lora)
    return {
        "tokens": c.get(f"{phase}_tokens"),
        "steps": c.get(f"{phase}_steps"),
        "seconds": round(t.get(f"{phase}_s", 0.0), 3),
        "tokens_per_s": tok_s,
        "flops_per_token": f_tok,
        "achieved_tflops": round(tok_s * f_tok / 1e12, 6),
        "mfu": mfu(tok_s, f_tok, peak),
        "final_loss": c.get(f"{phase}_final_loss"),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quick preset (the default sizes); explicit flags still win")
    ap.add_argument("--rows", type=int, help=f"SFT rows = preference rows = bundled prompts, half red-team (max 96; default {QUICK['rows']})")
    ap.add_argument("--answer-tokens", type=int, help=f"token cap of the model's own answers used as training text (default {QUICK['answer_tokens']})")
    ap.add_argument("--sft-batch-size", type=int, help=f"SFT per-device batch (default {QUICK['sft_batch_size']}, the demo's)")
    ap.add_argument("--dpo-batch-size", type=int, help=f"DPO per-device batch (default {QUICK['dpo_batch_size']}, the demo's)")
    ap.add_argument("--max-length", type=int, help=f"tokens per example (default {QUICK['max_length']})")
    ap.add_argument("--lora", action="store_true", help="also run with LoRA adapters and report LoRA vs full per phase")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed one-step warm-up run (its first trainer pays one-off costs in this process)")
    ap.add_argument("--model", default=BUNDLED_MODEL, help=f"model reference (default {BUNDLED_MODEL})")
    ap.add_argument("--peak-tflops", type=float, help="peak FLOP/s of the device in TFLOP/s for MFU (default: from the GPU name; none on CPU)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path (default bench/results/train.json)")
    args = ap.parse_args(argv)
    for key, value in QUICK.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 2 <= args.rows <= 96:
        ap.error("--rows must be between 2 and 96 (48 train prompts in each bundled set)")
    if min(args.answer_tokens, args.sft_batch_size, args.dpo_batch_size, args.max_length) < 1:
        ap.error("--answer-tokens, --sft-batch-size, --dpo-batch-size and --max-length must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    machine = machine_info()

    from jobs.config import EngineConfig
    from jobs.engines import SamplingParams, load_engine
    from jobs.models import resolve_model

    model_path = resolve_model(args.model)
    params = count_params(model_path)
    peak = args.peak_tflops or peak_tflops_for(machine["gpu"])
    records = bench_prompts(args.rows)

    log(f"training text: the model's own answers to {len(records)} prompts, up to {args.answer_tokens} tokens (not timed)")
    engine = load_engine(EngineConfig(backend="hf", dtype="auto", batch_size=32), model_path)
    engine.show_progress = False
    answers = engine.generate([r.conversation for r in records], SamplingParams(max_new_tokens=args.answer_tokens), desc="answers")
    del engine
    gc.collect()
    traces, prefs = training_inputs(records, answers)

    variants = [("full", False)] + ([("lora", True)] if args.lora else [])
    if not args.no_warmup:
        # One step of each phase, not timed: the first trainer of a process pays one-off costs (kernel and
        # allocator warm-up, lazy imports, CUDA context) that would be booked to SFT alone.
        n = max(args.sft_batch_size, args.dpo_batch_size)
        log(f"warm-up (not timed): one step of SFT and DPO on {n} rows")
        for _, lora in variants:
            run_train_stage(args.model, traces[:n], prefs[:n], train_config(args, lora), args.seed)
    shares: dict[str, float | None] = {}
    results: dict[str, dict[str, Any]] = {}
    for name, lora in variants:
        log(f"train stage ({name}): SFT on {len(traces)} rows (batch {args.sft_batch_size}), then DPO on {len(prefs)} pairs "
            f"(batch {args.dpo_batch_size}), 1 epoch each, max_length {args.max_length}")
        with OtherLoad() as load:
            t0 = time.perf_counter()
            res = run_train_stage(args.model, traces, prefs, train_config(args, lora), args.seed)
            wall = time.perf_counter() - t0
        shares[f"train_{name}"] = load.share
        results[name] = {
            "lora": lora,
            "stage_wall_s": round(wall, 3),
            "sft": phase_figures(res, "sft", params, lora, peak),
            "dpo": phase_figures(res, "dpo", params, lora, peak),
            "save_s": round(res["timings"].get("save_s", 0.0), 3),
        }

    warnings = finish_machine(machine, shares)
    full = results["full"]
    print_report_header(machine, warnings)
    device = machine["gpu"] or "CPU"
    print(f"model: {args.model} ({params / 1e6:.1f}M parameters) on {device}; peak for MFU: "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown (CPU or unlisted GPU; --peak-tflops sets it)'}")
    print()
    rows = []
    for name, r in results.items():
        for phase in ("sft", "dpo"):
            f = r[phase]
            rows.append([f"{phase.upper()} ({name})", f["steps"], f["tokens"], f["seconds"], f["tokens_per_s"], f["achieved_tflops"],
                         f["mfu"], f"{f['tokens_per_s'] / full['sft']['tokens_per_s']:.2f}x" if full["sft"]["tokens_per_s"] else None])
    print(format_table(["phase", "steps", "tokens", "seconds", "tokens/s", "TFLOP/s", "MFU", "vs SFT (full)"], rows))
    print()
    print("tokens = trl's count of non-padding tokens trained on (DPO: chosen + rejected); seconds = trainer.train() wall time; "
          "FLOPs/token 6N (SFT), 8N (DPO: + reference forward); LoRA 4N / 6N")

    ratio_dpo = ratio(full["dpo"]["tokens_per_s"], full["sft"]["tokens_per_s"])
    result = {
        "machine": machine,
        "command": command_line(argv, "bench/train.py"),
        "date": now_iso(),
        "model": args.model,
        "params": params,
        "device": device,
        "precision": "bf16 autocast, fp32 master weights" if machine["gpu"] else "fp32",
        "rows": args.rows,
        "sft_batch_size": args.sft_batch_size,
        "dpo_batch_size": args.dpo_batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "warmup": not args.no_warmup,
        "peak_tflops": peak,
        "sft_tok_s": full["sft"]["tokens_per_s"],
        "dpo_tok_s": full["dpo"]["tokens_per_s"],
        "sft_mfu": full["sft"]["mfu"],
        "dpo_mfu": full["dpo"]["mfu"],
        "ratio_dpo_vs_sft": ratio_dpo,
        "ratio": ratio_dpo,
        "baseline": "sft (full fine-tuning)",
        "ratio_lora_vs_full_sft": ratio(results["lora"]["sft"]["tokens_per_s"], full["sft"]["tokens_per_s"]) if "lora" in results else None,
        "ratio_lora_vs_full_dpo": ratio(results["lora"]["dpo"]["tokens_per_s"], full["dpo"]["tokens_per_s"]) if "lora" in results else None,
        "variants": results,
    }
    write_json_atomic(args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
