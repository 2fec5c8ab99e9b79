"""Benchmark: the transformers engine's own decode loop vs transformers' `generate`, in the generate stage.

The same stage code (`revise_chunk`) on the same prompts, on a fresh transformers engine per side, with
prefix reuse on (the stage default) and `engine.decode` set to:

- `generate` — transformers' own loop (growing K/V cache): the baseline;
- `static` — the engine's loop over a fixed-size K/V cache (`jobs.engines.decode`): the CPU default;
- `compiled` — that loop with its step through torch.compile (the GPU default, where it also becomes
  a CUDA graph). Its first pass compiles and is not timed; the prefix cache is emptied before the
  timed pass, so that pass reads no more from it than the others do.

Greedy decoding must give the same text on every side: the script checks it and exits 1 if not.

    .venv/bin/python bench/decode.py                      # 32 prompts, 1 round, 64 tokens, generate vs static
    .venv/bin/python bench/decode.py --sides generate,static,compiled

Results: a table on stdout and bench/results/decode.json (written atomically).
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
    RESULTS, OtherLoad, bench_prompts, command_line, finish_machine, format_table, log, machine_info,
    now_iso, print_report_header, rate, ratio, write_json_atomic,
)
from bench.prefix_reuse import check_stage_args, run_side, stage_arg_parser  # noqa: E402

DEFAULT_OUT = RESULTS / "decode.json"
SIDES = ("generate", "static", "compiled")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = stage_arg_parser(__doc__.split("\n\n")[0], DEFAULT_OUT)
    ap.add_argument("--sides", default="generate,static", help=f"comma-separated, from {', '.join(SIDES)}; "
                    "generate (the baseline) always runs first (default generate,static)")
    ap.add_argument("--few-shot", type=int, default=0, help="worked examples per critique request (default 0)")
    args = ap.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    if any(s not in SIDES for s in sides):
        ap.error(f"--sides: use {', '.join(SIDES)}")
    args.sides = ["generate"] + [s for s in SIDES[1:] if s in sides]
    check_stage_args(ap, args, [args.few_shot])
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
    cache_gb = EngineConfig().prefix_cache_gb
    sides: dict[str, dict[str, Any]] = {}
    shares: dict[str, float | None] = {}
    for side in args.sides:
        log(f"decode {side}: {len(prompts)} prompts x {1 + 2 * args.rounds} steps"
            + (" (an untimed first pass compiles the step)" if side == "compiled" else ""))
        with OtherLoad() as load:
            sides[side] = run_side(model_path, prompts, constitution, args, args.few_shot, cache_gb, decode=side,
                                   untimed_first_pass=side == "compiled")
        shares[side] = load.share
    warnings = finish_machine(machine, shares)

    reference = sides["generate"]["outputs"]
    rows = []
    for side, res in sides.items():
        res["same_text_as_generate"] = res.pop("outputs") == reference
        res["tok_s"] = round(rate(res["tokens"], res["seconds"]), 2)
        res["ratio_vs_generate"] = ratio(res["tok_s"], sides["generate"]["tok_s"]) if side != "generate" else 1.0
        steps = res["steps"]
        rows.append([side, res["tokens"], round(res["seconds"], 1), res["tok_s"],
                     *(round(steps[s]["seconds"], 1) if s in steps else None for s in ("respond", "critique", "revise")),
                     res.get("untimed_first_pass_s"), f"{res['ratio_vs_generate']:.2f}x", res["same_text_as_generate"]])
    print_report_header(machine, warnings)
    print(f"model: {args.model}, float32 on cpu, greedy; {len(prompts)} prompts x (1 + 2x{args.rounds}) steps, "
          f"{args.max_new_tokens} new tokens per step, batch {args.batch_size}, few-shot {args.few_shot}, prefix reuse on")
    print()
    print(format_table(["decode", "tokens", "seconds", "tok/s", "respond s", "critique s", "revise s",
                        "untimed first pass s", "vs generate", "same text"], rows))
    identical = all(res["same_text_as_generate"] for res in sides.values())
    write_json_atomic(args.out, {
        "machine": machine, "command": command_line(argv, "bench/decode.py"), "date": now_iso(),
        "model": args.model, "prompts": len(prompts), "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "few_shot": args.few_shot, "sides": sides,
        **{f"ratio_{side}_vs_generate": res["ratio_vs_generate"] for side, res in sides.items() if side != "generate"},
        "ratio": sides["static"]["ratio_vs_generate"] if "static" in sides else None,
        "outputs_identical": identical,
    })
    log(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
