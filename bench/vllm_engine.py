"""Benchmark: the engines alone on one batched call, vLLM (bf16/fp32, compiled/eager) against transformers.

Same bundled model, same prompts (N/2 red-team + N/2 helpful from the bundled train splits), greedy,
one `generate` call of all prompts with the same token cap. Each side runs in its own process (so
start time and peak memory are its own): load, one warm-up call (not timed), then `--runs` timed
calls; the best is reported. Baseline: the transformers engine in fp32 (its CPU default), batched.
`compiled` = vLLM's default torch.compile at start; `eager` = VLLM_CPU_CI_ENV=1 (no compile).

Needs vLLM: run it in the vLLM venv (`make install-vllm`).

    .venv-vllm/bin/python bench/vllm_engine.py                      # 32 prompts x 64 tokens, all sides
    .venv-vllm/bin/python bench/vllm_engine.py --sides hf:float32 vllm:float32:compiled

Results: a table on stdout and bench/results/vllm_engine.json (written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's `jobs` and `bench`
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BUNDLED_MODEL, RESULTS, OtherLoad, command_line, finish_machine, format_table, log, machine_info, now_iso,
    print_report_header, ratio, write_json_atomic,
)

SIDES = ["hf:float32", "vllm:float32:eager", "vllm:bfloat16:eager", "vllm:float32:compiled", "vllm:bfloat16:compiled"]


def child(side: str, prompts: int, max_new_tokens: int, runs: int) -> dict:
    """One side, in this process: start, warm-up, timed calls."""
    backend, dtype, *mode = side.split(":")
    if backend == "vllm":
        os.environ["VLLM_CPU_CI_ENV"] = "1" if mode == ["eager"] else "0"
    from bench.common import bench_prompts
    from jobs.engines.base import SamplingParams
    from jobs.models import resolve_model

    model = resolve_model(BUNDLED_MODEL)
    convs = [p.conversation for p in bench_prompts(prompts)]
    t0 = time.perf_counter()
    if backend == "vllm":
        from jobs.engines.vllm import VLLMEngine

        engine = VLLMEngine(model, dtype=dtype, show_progress=False)
    else:
        from jobs.engines.hf import HFEngine

        engine = HFEngine(model, dtype=dtype, device="cpu", batch_size=prompts, show_progress=False, prefix_cache_gb=0)
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_new_tokens=max_new_tokens)
    t = time.perf_counter()
    first = engine.generate(convs, params, desc="warm-up")
    first_s = time.perf_counter() - t
    timed = []
    for _ in range(runs):
        tokens0, t = engine.stats.generated_tokens, time.perf_counter()
        out = engine.generate(convs, params, desc="timed")
        timed.append({"tokens": engine.stats.generated_tokens - tokens0, "seconds": round(time.perf_counter() - t, 3)})
        assert out == first, "greedy outputs changed between calls"
    best = max(timed, key=lambda r: r["tokens"] / r["seconds"])
    return {
        "side": side, "start_s": round(start_s, 1), "first_call_s": round(first_s, 1), "runs": timed,
        "tokens": best["tokens"], "tok_s": round(best["tokens"] / best["seconds"], 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "outputs": first,
    }


def run_side(side: str, args) -> tuple[dict, float | None]:
    log(f"{side}: start, warm-up, {args.runs} timed calls of {args.prompts} prompts x {args.max_new_tokens} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"  # a file, not stdout: vLLM's worker processes may print there
        cmd = [sys.executable, __file__, "--child", side, "--child-out", str(out), "--prompts", str(args.prompts),
               "--max-new-tokens", str(args.max_new_tokens), "--runs", str(args.runs)]
        with OtherLoad() as load:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text()), load.share


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", nargs="+", default=SIDES, help=f"backend:dtype[:compiled|eager] (default: {' '.join(SIDES)})")
    ap.add_argument("--prompts", type=int, default=32, help="prompts in the one call (default 32, at most 96)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="token cap per prompt (default 64)")
    ap.add_argument("--runs", type=int, default=2, help="timed calls per side; the best counts (default 2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "vllm_engine.json")
    args = ap.parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(child(args.child, args.prompts, args.max_new_tokens, args.runs)))
        return 0
    for side in args.sides:
        backend, dtype, *mode = side.split(":")
        if backend not in ("hf", "vllm") or dtype not in ("float32", "bfloat16") or mode not in ([], ["compiled"], ["eager"]):
            ap.error(f"--sides: {side!r} is not backend:dtype[:compiled|eager] (hf|vllm, float32|bfloat16)")

    machine = machine_info()
    results, shares = {}, {}
    for side in args.sides:
        results[side], shares[side.replace(":", "_")] = run_side(side, args)
    warnings = finish_machine(machine, shares)
    base = results.get("hf:float32")
    reference = base["outputs"] if base else None
    rows = []
    for side, r in results.items():
        r["ratio_vs_hf_fp32"] = ratio(r["tok_s"], base["tok_s"]) if base else None
        r["greedy_equal_to_hf_fp32"] = (r["outputs"] == reference) if reference else None
        r["outputs_equal_to_hf_fp32"] = sum(a == b for a, b in zip(r["outputs"], reference)) if reference else None
        rows.append([side, r["start_s"], r["first_call_s"], r["tokens"], r["tok_s"],
                     f"{r['ratio_vs_hf_fp32']:.2f}x" if r["ratio_vs_hf_fp32"] else None,
                     f"{r['outputs_equal_to_hf_fp32']}/{len(r['outputs'])}" if reference else None, r["peak_rss_mb"]])
    print_report_header(machine, warnings)
    print(f"model: {BUNDLED_MODEL}; {args.prompts} prompts x {args.max_new_tokens} new tokens, greedy, one call; best of {args.runs}")
    print()
    print(format_table(["side", "start s", "1st call s", "tokens", "tok/s", "vs hf fp32", "= hf fp32", "peak RSS MB"], rows))
    for r in results.values():
        del r["outputs"]
    write_json_atomic(args.out, {
        "machine": machine, "command": command_line(argv, "bench/vllm_engine.py"), "date": now_iso(),
        "model": BUNDLED_MODEL, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "runs": args.runs,
        "sides": results,
        "hf_fp32_tok_s": base["tok_s"] if base else None,
        **{f"vllm_{dt}_{m}_tok_s": results[f"vllm:{dt}:{m}"]["tok_s"] for dt in ("float32", "bfloat16") for m in ("compiled", "eager")
           if f"vllm:{dt}:{m}" in results},
    })
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
