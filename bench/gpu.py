"""Benchmark: the transformers engine's decode loop vs transformers' `generate`, on a GPU.

There is no model hub on a GPU machine here, so the model is a random-init Qwen2 with the shapes of
Qwen2-0.5B (24 layers, hidden 896, 14 query / 2 K/V heads, vocab 151,936; bf16). Decode speed depends
on the shapes, not on the weights' values. Every side gets the same random 64-token prompts and
decodes exactly `--new-tokens` tokens (random weights never stop early, and `generate` is told to
ignore end-of-sequence), greedy, per batch size:

- `generate`: transformers' default `generate` (growing K/V cache, eager) — the baseline;
- `generate-static`: `generate(cache_implementation="static")`;
- `engine`: the engine's own loop (`jobs.engines.decode.StaticDecoder`) with a compiled step, which
  on CUDA replays each step as one CUDA graph (what `engine.decode: auto` picks on GPU).

Each side is warmed up once per batch size (the compile and graph capture happen there and are
reported, not timed), then timed `--repeats` times; the best run counts. Also reported: the
memory-bandwidth bound, the tokens/s if each step only had to read the weights and the K/V cache once
at the bandwidth a device-to-device copy reaches in the same run, and how close each side gets.

    python3 bench/gpu.py                           # on the GPU machine (writes bench/results/gpu.json)
    .venv/bin/python bench/gpu.py --model tiny --device cpu --batches 1,4 --new-tokens 8   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's `jobs` and `bench`
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    RESULTS, command_line, format_table, log, machine_info, machine_line, now_iso, ratio, write_json_atomic,
)

DEFAULT_OUT = RESULTS / "gpu.json"
SIDES = ("generate", "generate-static", "engine")

# Qwen2-0.5B's shapes (its config.json), and a tiny model of the same family for smoke runs.
MODELS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
                       tie_word_embeddings=True, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=True),
}


def build_model(name: str, device: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**MODELS[name], use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 0.5B model's random init is slow on the host
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float = 1.0) -> float | None:
    """Bytes/s a device-to-device copy moves (read + written): the practical memory-bandwidth ceiling."""
    import torch

    if not device.startswith("cuda"):
        return None
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del a, b
    return 2 * n * 2 / best


def bandwidth_bound(model, batch: int, prompt: int, new: int, bytes_per_s: float | None) -> float | None:
    """Tokens/s if each decode step read every weight once plus the K/V cache of its batch (mean context)."""
    if not bytes_per_s:
        return None
    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = c.hidden_size // c.num_attention_heads
    elem = next(model.parameters()).element_size()
    kv_bytes = batch * c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * elem * (prompt + new / 2)
    return batch / ((weight_bytes + kv_bytes) / bytes_per_s)


def make_side(name: str, model, engine_decode: str = "compiled"):
    """A function (ids, mask, new_tokens) -> generated ids [B, new_tokens]."""
    from jobs.engines.decode import StaticDecoder

    if name == "engine":
        decoder = StaticDecoder(model, compile=engine_decode == "compiled")

        def run(ids, mask, new):
            return decoder.run(ids, mask, new, stop_ids=[], pad_id=0).tokens
        return run
    extra = {"cache_implementation": "static"} if name == "generate-static" else {}

    def run(ids, mask, new):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, **extra)
        return out[:, ids.shape[1]:]
    return run


def measure(run, ids, mask, new: int, repeats: int, device: str) -> dict[str, Any]:
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = run(ids, mask, new)
        sync(device)
        warmup = time.perf_counter() - t0
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run(ids, mask, new)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    tokens = out.shape[0] * out.shape[1]
    return {"tokens": tokens, "seconds": round(best, 4), "tok_s": round(tokens / best, 1), "warmup_s": round(warmup, 1),
            "output": out.cpu()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2-0.5b")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--batches", default="1,128,256", help="comma-separated batch sizes (default 1,128,256)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    ap.add_argument("--engine-decode", choices=("compiled", "static"), default="compiled",
                    help="the engine side's loop: compiled step (CUDA graphs on GPU; engine.decode auto) or static (no compile)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side and batch after the warm-up; the best counts")
    ap.add_argument("--time-budget", type=float, default=480.0,
                    help="seconds; sides not started by then are skipped (results so far are written after each side)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"--sides: unknown {', '.join(unknown)}; use {', '.join(SIDES)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    started = time.perf_counter()
    machine = machine_info()
    log(machine_line(machine))
    model = build_model(args.model, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    bw = copy_bandwidth(device)
    result: dict[str, Any] = {
        "benchmark": "gpu", "command": command_line(argv, "bench/gpu.py"), "date": now_iso(), "machine": machine,
        "model": args.model, "parameters": params, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "engine_decode": args.engine_decode,
        "copy_bandwidth_gb_s": round(bw / 1e9, 1) if bw else None, "runs": [], "skipped": [],
    }
    log(f"model {args.model}: {params / 1e6:.0f}M parameters, {result['dtype']} on {device}; "
        f"copy bandwidth {result['copy_bandwidth_gb_s']} GB/s")
    gen = torch.Generator().manual_seed(0)
    sides = sorted(sides, key=SIDES.index)  # the baseline first: the others' tokens are compared with it
    for batch in batches:
        reference = None
        ids = torch.randint(100, model.config.vocab_size, (batch, args.prompt_tokens), generator=gen).to(device)
        mask = torch.ones_like(ids)
        bound = bandwidth_bound(model, batch, args.prompt_tokens, args.new_tokens, bw)
        for side in sides:
            if time.perf_counter() - started > args.time_budget:
                result["skipped"].append({"side": side, "batch": batch, "why": "time budget"})
                log(f"{side} batch {batch}: skipped (time budget)")
                continue
            log(f"{side} batch {batch}: warming up")
            row = {"side": side, "batch": batch, **measure(make_side(side, model, args.engine_decode), ids, mask, args.new_tokens, args.repeats, device)}
            out = row.pop("output")
            if side == "generate":
                reference = out
            # greedy tokens equal to default generate's (bf16 kernels may differ in the last bit, and one
            # flipped argmax changes the rest of that row)
            row["same_tokens_as_generate"] = round(float((out == reference).float().mean()), 4) if reference is not None else None
            row["bandwidth_bound_tok_s"] = round(bound, 1) if bound else None
            row["share_of_bound"] = ratio(row["tok_s"], bound) if bound else None
            result["runs"].append(row)
            log(f"{side} batch {batch}: {row['tok_s']:.0f} tok/s (warm-up {row['warmup_s']}s)")
            finish(result, args.out)
    print_report(result)
    return 0


def finish(result: dict[str, Any], out: Path) -> None:
    """Ratios against default `generate` at the same batch, and whether the engine met the issue's
    target (>= 5x at batch >= 128); written after every side so a cut-off run keeps what it measured."""
    base = {r["batch"]: r["tok_s"] for r in result["runs"] if r["side"] == "generate"}
    for r in result["runs"]:
        r["ratio_vs_generate"] = ratio(r["tok_s"], base[r["batch"]]) if r["batch"] in base else None
    big = [r["ratio_vs_generate"] for r in result["runs"] if r["side"] == "engine" and r["batch"] >= 128 and r["ratio_vs_generate"]]
    result["ratio"] = max(big) if big else None  # engine vs default generate at batch >= 128
    write_json_atomic(out, result)


def print_report(result: dict[str, Any]) -> None:
    print()
    print(machine_line(result["machine"]))
    print(f"model {result['model']} ({result['parameters'] / 1e6:.0f}M, random init), {result['dtype']} on {result['device']}, "
          f"{result['prompt_tokens']}-token prompts, {result['new_tokens']} new tokens, greedy; "
          f"copy bandwidth {result['copy_bandwidth_gb_s'] or 'n/a'} GB/s")
    rows = [(r["side"], r["batch"], r["tokens"], r["seconds"], r["tok_s"], r["warmup_s"],
             f"{r['ratio_vs_generate']:.2f}x" if r.get("ratio_vs_generate") else "-",
             f"{r['share_of_bound']:.0%}" if r.get("share_of_bound") else "-",
             f"{r['same_tokens_as_generate']:.0%}" if r.get("same_tokens_as_generate") is not None else "-") for r in result["runs"]]
    print(format_table(["side", "batch", "tokens", "seconds", "tok/s", "warm-up s", "vs generate", "of bandwidth bound",
                        "same tokens"], rows))
    if result["skipped"]:
        print("skipped: " + ", ".join(f"{s['side']} batch {s['batch']} ({s['why']})" for s in result["skipped"]))


if __name__ == "__main__":
    raise SystemExit(main())
