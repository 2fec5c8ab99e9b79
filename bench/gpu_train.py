"""Benchmark: train-stage throughput and MFU (model FLOPs utilisation) for SFT and DPO, on a GPU.

The trainers are the train stage's own: `jobs.stages.train._args` builds the trl configs (bf16 mixed
precision over fp32 master weights and gradient checkpointing on GPU), so what is timed is what a train
pod runs. Offline there is no hub, so the model is a random-init Qwen2 of `bench/gpu.py`'s shapes and
the tokenizer a word-level one built in memory: a text of k words is exactly k tokens, so every row has
the length asked for. Sides, each timed over `--steps` steps after `--warmup` untimed ones:

- `torch-sft`: the baseline, a hand-written loop (forward, loss, backward, AdamW) on the same batches;
- `trl-sft`: trl's SFTTrainer, prompt/completion rows, loss on the completion;
- `trl-dpo`: trl's DPOTrainer, (prompt, chosen, rejected) rows, a reference model in memory.

MFU as `bench/train.py` counts it (`flops_per_token`, `peak_tflops_for`): 6N model FLOPs per trained
token (forward and backward) and 8N for DPO (plus the reference's forward), N = all parameters, the tied
embedding once; checkpointing's recomputed forward is not counted (that would be hardware FLOPs). The
roofline is the device's dense bf16 peak (`--peak-tflops`, or its name in bench/train.py's table).
bench/train.py measures the same stage on the bundled model; this one needs no model files, so it runs
on a GPU machine without a hub at a realistic size (0.5B, batch 16 x 512 tokens).

    python3 bench/gpu_train.py                                           # on the GPU machine
    .venv/bin/python bench/gpu_train.py --model tiny --device cpu --batch 4 --steps 2 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jobs.memory import parameter_count  # noqa: E402 - plain Python: the device image has no pydantic
from bench.common import RESULTS, command_line, format_table, log, machine_info, machine_line, now_iso, ratio, write_json_atomic  # noqa: E402
from bench.gpu import MODELS  # noqa: E402
from bench.train import flops_per_token, mfu, peak_tflops_for  # noqa: E402

DEFAULT_OUT = RESULTS / "gpu_train.json"
SIDES = ("torch-sft", "trl-sft", "trl-dpo")


def word_tokenizer(vocab: int):
    """A word-level fast tokenizer over `w0 .. w{vocab-5}`: one word, one token; no files, no hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(vocab - 4)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")


def rows(n: int, prompt: int, completion: int, vocab: int, seed: int = 0) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(k))

    return [{"prompt": text(prompt), "completion": " " + text(completion - 1), "chosen": " " + text(completion - 1),
             "rejected": " " + text(completion - 1)} for _ in range(n)]


class StepClock:
    """Wall time of each optimizer step, synchronised with the device so queued kernels count."""

    def __init__(self, device: str):
        self.device, self.times, self._t = device, [], 0.0

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def begin(self) -> None:
        self.sync()
        self._t = time.perf_counter()

    def end(self) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self._t)


def trainer_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.end()

    return Clock()


def run_side(side: str, shape: dict[str, Any], device: str, batch: int, prompt: int, completion: int, steps: int,
             warmup: int, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, set_seed
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from jobs.config import DPOSection, SFTSection
    from jobs.stages.train import _args

    set_seed(0)
    if device.startswith("cuda"):  # each side's own peak, from a clean slate
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    total = steps + warmup
    tok = word_tokenizer(shape["vocab_size"])
    data = rows(batch * total, prompt, completion, shape["vocab_size"])

    def model():
        with torch.device(device):
            return Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=False))  # fp32 master weights, as the stage loads

    clock = StepClock(device)
    method = "dpo" if side == "trl-dpo" else "sft"
    length = prompt + completion  # trl: the prompt's words, the completion's, and its end-of-sequence token
    if side == "torch-sft":
        m = model().train()
        cuda = device.startswith("cuda")
        if cuda:  # as the trainers run on GPU (the stage's _device_args): the same recomputation on both sides
            m.gradient_checkpointing_enable()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        ids = tok([r["prompt"] + r["completion"] for r in data], return_tensors="pt")["input_ids"].to(device)
        length = ids.shape[1]  # the words of prompt and completion, no end-of-sequence token
        for step in range(total):
            clock.begin()
            x = ids[step * batch:(step + 1) * batch]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = m(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            clock.end()
    else:
        section = (SFTSection if method == "sft" else DPOSection)(epochs=1, batch_size=batch, max_length=length + 8, learning_rate=1e-5)
        cfg_cls, trainer_cls = (SFTConfig, SFTTrainer) if method == "sft" else (DPOConfig, DPOTrainer)
        extra = {"completion_only_loss": True} if method == "sft" else {"beta": 0.1}
        args = _args(cfg_cls, method, section, work, 0, max_steps=total, **extra)
        columns = ("prompt", "completion") if method == "sft" else ("prompt", "chosen", "rejected")
        ds = Dataset.from_list([{k: r[k] for k in columns} for r in data])
        kwargs = {"ref_model": model()} if method == "dpo" else {}
        trainer = trainer_cls(model=model(), args=args, train_dataset=ds, processing_class=tok, callbacks=[trainer_callback(clock)], **kwargs)
        trainer.train()
    timed = clock.times[warmup:]
    seconds = sum(timed)
    trained = batch * length * len(timed) * (2 if method == "dpo" else 1)  # DPO trains chosen and rejected
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    params = parameter_count(shape)  # the tied embedding once; Qwen2's q/k/v biases left out
    return {"side": side, "method": method, "batch": batch, "seq": length, "steps": len(timed), "seconds": round(seconds, 4),
            "tokens_per_s": round(trained / seconds, 1) if seconds else None, "params": params,
            "flops_per_token": flops_per_token(method, params, lora=False), "peak_mem_gib": round(peak_mem, 2) if peak_mem else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2-0.5b")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--batch", type=int, default=16, help="rows per step (DPO: pairs)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--completion-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak; default from the table")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    if bad := [s for s in sides if s not in SIDES]:
        print(f"error: --sides: unknown {', '.join(bad)}; choose from {', '.join(SIDES)}", file=sys.stderr)
        return 2
    if min(args.batch, args.steps, args.prompt_tokens, args.completion_tokens) < 1 or args.warmup < 0:
        print("error: --batch, --steps and the token counts must be at least 1, --warmup at least 0", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and torch.cuda.is_available():  # the trainers would still take the GPU (transformers picks it)
        print("error: --device cpu on a machine with a GPU: the trl sides would train on the GPU; run with "
              "CUDA_VISIBLE_DEVICES= for a CPU run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device.startswith("cuda") else None
    peak = args.peak_tflops or peak_tflops_for(name)
    machine = machine_info()
    log(f"machine: {machine_line(machine)}; device {name or device}; bf16 peak {peak or 'n/a'} TFLOP/s")
    runs = []
    with tempfile.TemporaryDirectory(prefix="cai-gpu-train-") as tmp:
        for side in sides:
            log(f"{side}: batch {args.batch} x {args.prompt_tokens + args.completion_tokens} tokens, {args.steps} steps")
            runs.append(run_side(side, MODELS[args.model], device, args.batch, args.prompt_tokens, args.completion_tokens,
                                 args.steps, args.warmup, Path(tmp)))
    base = next((r for r in runs if r["side"] == "torch-sft"), None)
    for r in runs:
        r["model_tflops"] = round(r["tokens_per_s"] * r["flops_per_token"] / 1e12, 3) if r["tokens_per_s"] else None
        r["mfu"] = mfu(r["tokens_per_s"], r["flops_per_token"], peak) if r["tokens_per_s"] else None
        r["ratio_vs_torch_sft"] = ratio(r["tokens_per_s"], base["tokens_per_s"]) if base else None
    result = {"benchmark": "gpu_train", "machine": machine, "command": command_line(sys.argv[1:] if argv is None else argv, "bench/gpu_train.py"),
              "date": now_iso(), "model": args.model, "device": name or device, "peak_tflops": peak, "runs": runs}
    write_json_atomic(args.out, result)
    headers = ["side", "batch", "seq", "tokens/s", "model TFLOP/s", "MFU", "vs torch-sft", "peak GiB"]
    print(format_table(headers, [[r["side"], r["batch"], r["seq"], r["tokens_per_s"], r["model_tflops"],
                                  f"{r['mfu']:.1%}" if r["mfu"] is not None else None,
                                  f"{r['ratio_vs_torch_sft']:.2f}x" if r["ratio_vs_torch_sft"] else None, r["peak_mem_gib"]] for r in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
