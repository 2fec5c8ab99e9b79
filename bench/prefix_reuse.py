"""Benchmark: what prefix reuse buys the `generate` stage on the transformers engine.

The same stage code (`revise_chunk`) on the same prompts runs twice per few-shot setting: with the
engine's prefix reuse off (`prefix_cache_gb: 0`, the baseline) and on (the stage default). Reuse
means two things: a critique or revision request that extends the previous step's text reads only
its new tail, and rows of a batch that open the same way (the same worked example in front of
their critique requests) have that opening read once. Both must leave the text unchanged: the
script checks that each pair of runs produced identical outputs.

    .venv/bin/python bench/prefix_reuse.py            # 32 prompts, 1 round, 64 tokens, few-shot 0 and 1
    .venv/bin/python bench/prefix_reuse.py --few-shot 1 --prompts 64

Results: a table on stdout and bench/results/prefix_reuse.json (written atomically).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's `jobs` and `bench`
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BUNDLED_MODEL, RESULTS, OtherLoad, bench_prompts, command_line, finish_machine, format_table, log, machine_info,
    now_iso, print_report_header, rate, ratio, write_json_atomic,
)

DEFAULT_OUT = RESULTS / "prefix_reuse.json"


def run_side(model_path: str, prompts, constitution, args, few_shot: int, cache_gb: float, decode: str = "auto",
             untimed_first_pass: bool = False) -> dict[str, Any]:
    """One stage run on a fresh engine (nothing cached from an earlier side); model loading not timed.
    `untimed_first_pass`: run the stage once before timing (to compile), then empty the prefix cache."""
    import time

    from bench.generate import run_stage
    from jobs.engines.hf import HFEngine

    engine = HFEngine(model_path, dtype="float32", device="cpu", batch_size=args.batch_size, show_progress=False,
                      prefix_cache_gb=cache_gb, decode=decode)
    first_pass_s = None
    if untimed_first_pass:
        t0 = time.perf_counter()
        run_stage(engine, prompts, constitution, args, few_shot)
        first_pass_s = round(time.perf_counter() - t0, 1)
        if engine.prefix_cache is not None:
            engine.prefix_cache.clear()
            engine.prefix_cache.stats = type(engine.prefix_cache.stats)()
    res, rows = run_stage(engine, prompts, constitution, args, few_shot)
    res["decode"] = engine.decode
    if first_pass_s is not None:
        res["untimed_first_pass_s"] = first_pass_s
    res["outputs"] = rows
    if engine.prefix_cache is not None:
        st = engine.prefix_cache.stats
        res.update(reused_tokens=st.reused_tokens, shared_tokens=st.shared_tokens, cache_prompt_tokens=st.prompt_tokens)
    return res


def stage_arg_parser(description: str, out: Path) -> argparse.ArgumentParser:
    """The stage-run flags this benchmark and bench/decode.py share: sizes, model, seed, output."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--prompts", type=int, default=32, help="half red-team, half helpful (default 32, at most 96)")
    ap.add_argument("--rounds", type=int, default=1, help="critique/revision rounds (default 1)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="token cap for every step (default 64)")
    ap.add_argument("--batch-size", type=int, default=32, help="engine batch size (default 32)")
    ap.add_argument("--model", default=BUNDLED_MODEL, help=f"model reference (default {BUNDLED_MODEL})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=out)
    return ap


def check_stage_args(ap: argparse.ArgumentParser, args: argparse.Namespace, few_shot: list[int]) -> None:
    if not 2 <= args.prompts <= 96:
        ap.error("--prompts must be between 2 and 96")
    if args.rounds < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or min(few_shot) < 0:
        ap.error("--rounds, --max-new-tokens and --batch-size must be >= 1, --few-shot >= 0")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = stage_arg_parser(__doc__.split("\n\n")[0], DEFAULT_OUT)
    ap.add_argument("--few-shot", type=int, nargs="+", default=[0, 1], help="few-shot settings to compare (default 0 1)")
    args = ap.parse_args(argv)
    check_stage_args(ap, args, args.few_shot)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from jobs.config import EngineConfig
    from jobs.constitution import load_constitution
    from jobs.models import resolve_model

    machine = machine_info()
    model_path = resolve_model(args.model)
    constitution = load_constitution("default")
    prompts = bench_prompts(args.prompts)
    sides: dict[str, dict[str, Any]] = {}
    shares: dict[str, float | None] = {}
    for k in args.few_shot:
        for name, gb in (("off", 0.0), ("on", EngineConfig().prefix_cache_gb)):
            key = f"few_shot_{k}_reuse_{name}"
            log(f"few-shot {k}, prefix reuse {name}: {len(prompts)} prompts x {1 + 2 * args.rounds} steps")
            with OtherLoad() as load:
                sides[key] = run_side(model_path, prompts, constitution, args, k, gb)
            shares[key] = load.share
    warnings = finish_machine(machine, shares)

    rows, result_sides = [], {}
    for k in args.few_shot:
        off, on = sides[f"few_shot_{k}_reuse_off"], sides[f"few_shot_{k}_reuse_on"]
        same = on.pop("outputs") == off.pop("outputs")
        for name, res in (("off", off), ("on", on)):
            res["tok_s"] = round(rate(res["tokens"], res["seconds"]), 2)
        r = ratio(on["tok_s"], off["tok_s"])
        result_sides[f"few_shot_{k}"] = {"reuse_off": off, "reuse_on": on, "ratio": r, "outputs_identical": same}
        for name, res in (("off (baseline)", off), ("on", on)):
            steps = res["steps"]
            rows.append([k, name, res["tokens"], round(res["seconds"], 1), res["tok_s"],
                         *(round(steps[s]["seconds"], 1) if s in steps else None for s in ("respond", "critique", "revise")),
                         f"{r:.2f}x" if name == "on" and r else "1.00x", same])
    print_report_header(machine, warnings)
    print(f"model: {args.model}, float32 on cpu, greedy; {len(prompts)} prompts x (1 + 2x{args.rounds}) steps, "
          f"{args.max_new_tokens} new tokens per step, batch {args.batch_size}")
    print()
    print(format_table(["few-shot", "prefix reuse", "tokens", "seconds", "tok/s", "respond s", "critique s", "revise s",
                        "vs off", "same text"], rows))
    write_json_atomic(args.out, {
        "machine": machine, "command": command_line(argv, "bench/prefix_reuse.py"), "date": now_iso(),
        "model": args.model, "prompts": len(prompts), "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "sides": result_sides,
        **{f"ratio_few_shot_{k}": result_sides[f"few_shot_{k}"]["ratio"] for k in args.few_shot},
        "ratio": result_sides[f"few_shot_{args.few_shot[-1]}"]["ratio"],
        "outputs_identical": all(v["outputs_identical"] for v in result_sides.values()),
    })
    log(f"wrote {args.out}")
    return 0 if all(v["outputs_identical"] for v in result_sides.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
