"""Benchmark: the `generate` stage (batched; transformers and vLLM engines) against the textbook
sequential critique-revision loop.

All sides run the same bundled model (SmolLM2-135M-Instruct, float32, CPU), greedy decoding, the
same prompts, the same token cap per step and the same number of steps per prompt (1 response +
2 x rounds critique/revision calls). Throughput is generated tokens / wall seconds of the timed work;
model loading (and vLLM's compile at start) is not timed, and reported apart.

The vLLM side runs the same stage code in the vLLM venv (`make install-vllm` creates `.venv-vllm`;
`CAI_VLLM_PYTHON` names another interpreter) as a child process; without it the side is skipped
and the JSON says why.

    .venv/bin/python bench/generate.py            # quick sizes (also what `--quick` selects)
    .venv/bin/python bench/generate.py --prompts 64 --rounds 2 --max-new-tokens 128
    .venv/bin/python bench/generate.py --no-vllm  # seed loop vs the transformers engine only

Results: a table on stdout and bench/results/generate.json (written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's `jobs`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    OtherLoad, bench_prompts, command_line, finish_machine, log, machine_info, machine_line, now_iso, rate, ratio,
    write_json_atomic,
)
from bench.common import rel_path as _rel  # noqa: E402
from jobs.config import EngineConfig, GenerateConfig  # noqa: E402
from jobs.constitution import Constitution, load_constitution  # noqa: E402
from jobs.data import PromptRecord  # noqa: E402
from jobs.engines.base import SamplingParams  # noqa: E402
from jobs.engines.hf import HFEngine  # noqa: E402
from jobs.models import resolve_model  # noqa: E402
from jobs.stages.generate import revise_chunk  # noqa: E402

MODEL_REF = "bundled:smollm2-135m-instruct"
DTYPE = "float32"
DEVICE = "cpu"
QUICK = {"prompts": 32, "rounds": 1, "max_new_tokens": 64, "batch_size": 32}
DEFAULT_OUT = ROOT / "bench" / "results" / "generate.json"


# --------------------------------------------------------------------------- per-step accounting

STEP_KINDS = ("respond", "critique", "revise")


def add_step(steps: dict[str, dict], kind: str, **counts: float) -> None:
    row = steps.setdefault(kind, {"calls": 0, "sequences": 0, "prompt_tokens": 0, "tokens": 0, "seconds": 0.0})
    for key, value in counts.items():
        row[key] += value


def step_kind(desc: str) -> str:
    """revise_chunk's engine call labels ('respond', 'round 1/2 critique', ...) -> respond/critique/revise."""
    for kind in STEP_KINDS:
        if desc.endswith(kind):
            return kind
    return desc


class StepRecorder:
    """Wraps an engine for revise_chunk and books each generate call's time and tokens under its step."""

    def __init__(self, engine):
        self.engine = engine
        self.stats = engine.stats
        self.steps: dict[str, dict] = {}

    def generate(self, conversations, params, desc: str = "generate"):
        st = self.engine.stats
        before = (st.calls, st.sequences, st.prompt_tokens, st.generated_tokens)
        t0 = time.perf_counter()
        out = self.engine.generate(conversations, params, desc=desc)
        seconds = time.perf_counter() - t0
        add_step(self.steps, step_kind(desc), calls=st.calls - before[0], sequences=st.sequences - before[1],
                 prompt_tokens=st.prompt_tokens - before[2], tokens=st.generated_tokens - before[3], seconds=seconds)
        return out

    def score(self, prompts, continuations, desc: str = "score"):
        return self.engine.score(prompts, continuations, desc=desc)

    def render(self, conversation, add_generation_prompt: bool = True):
        return self.engine.render(conversation, add_generation_prompt)


def totals(steps: dict[str, dict], seconds: float) -> dict:
    """Whole-run figures: tokens and counts summed over steps; seconds = wall time around the whole run."""
    res = {key: sum(row[key] for row in steps.values()) for key in ("calls", "sequences", "prompt_tokens", "tokens")}
    res["seconds"] = seconds
    res["steps"] = {k: {**v, "seconds": round(v["seconds"], 3)} for k, v in steps.items()}
    return res


# --------------------------------------------------------------------------- baseline: the seed loop


class SeedLoop:
    """The textbook loop ("Code Fragment 17.3.2 shape"): one prompt, one generate call at a time.

    Written for this benchmark. Prompts go through the model's chat template: the initial response
    sees the user's conversation; critique and revision requests are the textbook's plain-text
    inputs ("Here is a conversation: ... Critique request: ... Critique:") sent as one user turn.
    Greedy, batch 1, stop at the tokenizer's eos (<|im_end|> for this model) or max_new_tokens.
    """

    def __init__(self, model_path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(DEVICE)
        self.model.eval()
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.steps: dict[str, dict] = {}

    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        out = self.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        if isinstance(out, dict) or hasattr(out, "keys"):  # some transformers versions return a BatchEncoding
            out = out["input_ids"]
        return list(out)

    @torch.inference_mode()
    def generate(self, conversation: list[dict[str, str]], max_new_tokens: int, step: str) -> str:
        t0 = time.perf_counter()
        ids = self.encode(conversation)
        input_ids = torch.tensor([ids], dtype=torch.long, device=DEVICE)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        new = out[0, len(ids):].tolist()
        n = next((k + 1 for k, t in enumerate(new) if t == self.eos_id), len(new))  # up to and including eos
        text = self.tokenizer.decode(new[:n], skip_special_tokens=True).strip()
        add_step(self.steps, step, calls=1, sequences=1, prompt_tokens=len(ids), tokens=n, seconds=time.perf_counter() - t0)
        return text

    def run(self, prompts: list[PromptRecord], constitution: Constitution, rounds: int, max_new_tokens: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        traces = []
        for p in prompts:
            response = self.generate(p.conversation, max_new_tokens, "respond")
            human = "\n".join(f"{'Human' if r == 'user' else r.capitalize()}: {c}" for r, c in p.messages)
            rounds_out = []
            for _ in range(rounds):
                principle = rng.choice(constitution.for_kind(p.kind))
                critique_input = (
                    f"Here is a conversation:\n\n{human}\nAssistant: {response}\n\n"
                    f"Critique request: {principle.critique}\nCritique:"
                )
                critique = self.generate([{"role": "user", "content": critique_input}], max_new_tokens, "critique")
                revision_input = (
                    f"{critique_input} {critique}\n\nRevision request: {principle.revision}\nRevised response:"
                )
                response = self.generate([{"role": "user", "content": revision_input}], max_new_tokens, "revise")
                rounds_out.append({"principle": principle.name, "critique": critique, "revision": response})
            traces.append({"id": p.id, "rounds": rounds_out, "final": response})
        return traces


# --------------------------------------------------------------------------- measurement


def run_seed_loop(model_path: str, prompts, constitution, args) -> dict:
    log(f"seed loop: loading model, {len(prompts)} prompts x {1 + 2 * args.rounds} steps, batch 1")
    loop = SeedLoop(model_path)
    loop.generate([{"role": "user", "content": "Hi"}], 4, "warmup")  # not timed
    loop.steps.clear()
    t0 = time.perf_counter()
    loop.run(prompts, constitution, args.rounds, args.max_new_tokens, args.seed)
    res = totals(loop.steps, time.perf_counter() - t0)
    del loop
    return res


def stage_config(prompts, args, few_shot: int = 0) -> GenerateConfig:
    return GenerateConfig(
        revision_rounds=args.rounds,
        max_new_tokens=args.max_new_tokens,
        critique_max_new_tokens=args.max_new_tokens,
        few_shot=few_shot,
        temperature=0.0,
        chunk_size=max(len(prompts), 1),
    )


def run_stage(engine, prompts, constitution, args, few_shot: int = 0) -> tuple[dict, list[dict]]:
    """The generate stage's own batch loop (revise_chunk) on a loaded engine, after one untimed
    warm-up call: (step totals, the stage's output rows)."""
    engine.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=4), desc="warmup")  # not timed
    recorder = StepRecorder(engine)
    t0 = time.perf_counter()
    rows = revise_chunk(prompts, constitution, recorder, stage_config(prompts, args, few_shot), args.seed)
    return totals(recorder.steps, time.perf_counter() - t0), rows


def run_hf_stage(model_path: str, prompts, constitution, args) -> dict:
    log(f"cai generate stage (hf): loading model, {len(prompts)} prompts x {1 + 2 * args.rounds} steps, batch {args.batch_size}")
    engine = HFEngine(
        model_path, dtype=DTYPE, device=DEVICE, batch_size=args.batch_size, show_progress=False,
        prefix_cache_gb=EngineConfig().prefix_cache_gb,  # the stage's default
    )
    res, _ = run_stage(engine, prompts, constitution, args)
    if engine.prefix_cache is not None:
        res["prefix_reuse_rate"] = round(engine.prefix_cache.stats.reuse_rate, 3)
        log(f"prefix cache: {res['prefix_reuse_rate']:.0%} of prompt tokens reused from the previous step")
    del engine
    return res


def vllm_python() -> tuple[str | None, str]:
    """The interpreter that has vLLM (this one, CAI_VLLM_PYTHON or .venv-vllm), or None and why not."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, "this interpreter"
    candidate = os.environ.get("CAI_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(candidate).exists():
        return None, f"no vLLM here and no {_rel(candidate)} (run `make install-vllm`)"
    return candidate, _rel(candidate)


def run_vllm_child(args) -> None:
    """In the vLLM interpreter: the same stage and prompts with the vLLM engine (fp32, compiled)."""
    from jobs.engines.vllm import VLLMEngine

    model_path = resolve_model(args.model)
    prompts = bench_prompts(args.prompts)
    engine = VLLMEngine(model_path, dtype=DTYPE, device=DEVICE, show_progress=False)
    res, _ = run_stage(engine, prompts, load_constitution("default"), args)
    import vllm

    res.update(start_s=round(engine.start_seconds, 1), vllm=vllm.__version__,
               compiled=os.environ.get("VLLM_CPU_CI_ENV", "0") in ("", "0"),
               prefix_reuse_rate=round(engine.stats.cached_prompt_tokens / max(res["prompt_tokens"], 1), 3))
    args.vllm_child.write_text(json.dumps(res))


def run_vllm_stage(args, argv: list[str]) -> tuple[dict | None, str]:
    python, where = vllm_python()
    if python is None:
        log(f"cai generate stage (vllm): skipped: {where}")
        return None, where
    log(f"cai generate stage (vllm): {where}; starting vLLM (it compiles the model first: about a minute on 2 cores)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"  # a file, not stdout: vLLM may print there
        proc = subprocess.run([python, str(Path(__file__).resolve()), *argv, "--vllm-child", str(out)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"cai generate stage (vllm) failed (exit {proc.returncode}): {tail[0]}")
        return json.loads(out.read_text()), where


def print_table(machine: dict, args, n_prompts: int, seed_res: dict, hf_res: dict, extrap: dict | None,
                vllm_res: dict | None = None) -> None:
    seed_tps, hf_tps = rate(seed_res["tokens"], seed_res["seconds"]), rate(hf_res["tokens"], hf_res["seconds"])
    print()
    print(machine_line(machine))
    print(f"model: {args.model}, dtype {DTYPE} on {DEVICE} (every side), greedy")
    print(f"work: {n_prompts} prompts x (1 + 2x{args.rounds}) steps, max_new_tokens={args.max_new_tokens} per step, "
          f"few_shot=0, seed={args.seed}")
    print()
    header = f"| {'side':<34} | {'batch':>5} | {'prompts':>7} | {'gen tokens':>10} | {'seconds':>8} | {'tok/s':>7} | {'vs seed':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    print(f"| {'seed loop (sequential)':<34} | {1:>5} | {seed_res['prompts']:>7} | {seed_res['tokens']:>10} | "
          f"{seed_res['seconds']:>8.1f} | {seed_tps:>7.1f} | {1.0:>6.2f}x |")
    if extrap:
        print(f"| {'  (extrapolated to all prompts)':<34} | {1:>5} | {n_prompts:>7} | {extrap['tokens']:>10.0f} | "
              f"{extrap['seconds']:>8.1f} | {seed_tps:>7.1f} | {'':>7} |")
    ratio = hf_tps / seed_tps if seed_tps else float("nan")
    print(f"| {'cai generate stage (hf)':<34} | {args.batch_size:>5} | {n_prompts:>7} | {hf_res['tokens']:>10} | "
          f"{hf_res['seconds']:>8.1f} | {hf_tps:>7.1f} | {ratio:>6.2f}x |")
    if vllm_res:
        v_tps = rate(vllm_res["tokens"], vllm_res["seconds"])
        v_ratio = v_tps / seed_tps if seed_tps else float("nan")
        print(f"| {'cai generate stage (vllm)':<34} | {'all':>5} | {n_prompts:>7} | {vllm_res['tokens']:>10} | "
              f"{vllm_res['seconds']:>8.1f} | {v_tps:>7.1f} | {v_ratio:>6.2f}x |")
        print(f"vllm {vllm_res['vllm']}: ready in {vllm_res['start_s']:.0f}s "
              f"({'compiled' if vllm_res['compiled'] else 'eager'}; not timed, like model loading on the other sides); "
              f"{vllm_res.get('prefix_reuse_rate', 0):.0%} of prompt tokens from its prefix cache")
    print()
    print("per step (engine-call time, summed over rounds; prompt tokens exclude padding):")
    for kind in STEP_KINDS:
        parts = []
        for name, res in (("seed", seed_res), ("hf", hf_res), ("vllm", vllm_res or {"steps": {}})):
            row = res["steps"].get(kind)
            if row:
                parts.append(f"{name} {row['tokens']} tok / {row['seconds']:.1f}s = {rate(row['tokens'], row['seconds']):.1f} tok/s "
                             f"(prompt {row['prompt_tokens'] / max(row['sequences'], 1):.0f} tok/seq)")
        print(f"  {kind:<8} " + "; ".join(parts))
    print()
    print(f"generate calls: seed {seed_res['calls']}, hf {hf_res['calls']} (batched); "
          f"mean prompt tokens per sequence: seed {seed_res['prompt_tokens'] / max(seed_res['sequences'], 1):.0f}, "
          f"hf {hf_res['prompt_tokens'] / max(hf_res['sequences'], 1):.0f}; "
          f"mean generated tokens per sequence: seed {seed_res['tokens'] / max(seed_res['sequences'], 1):.1f}, "
          f"hf {hf_res['tokens'] / max(hf_res['sequences'], 1):.1f}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"quick preset (the default sizes): {QUICK['prompts']} prompts, {QUICK['rounds']} round, "
                         f"{QUICK['max_new_tokens']} new tokens, batch {QUICK['batch_size']}; explicit flags still win")
    ap.add_argument("--prompts", type=int, help=f"prompts, half red-team and half helpful (max 96; default {QUICK['prompts']})")
    ap.add_argument("--rounds", type=int, help=f"critique/revision rounds per prompt (default {QUICK['rounds']})")
    ap.add_argument("--max-new-tokens", type=int, help=f"token cap for every step, both sides (default {QUICK['max_new_tokens']})")
    ap.add_argument("--batch-size", type=int, help=f"HFEngine batch size (default {QUICK['batch_size']})")
    ap.add_argument("--baseline-prompts", type=int, default=None,
                    help="run the seed loop on only the first K prompts (default: all, the same prompts as ours)")
    ap.add_argument("--extrapolate", action="store_true",
                    help="with --baseline-prompts K < N, also report the seed loop's estimated tokens and seconds for all N prompts")
    ap.add_argument("--seed", type=int, default=0, help="principle-sampling seed (default 0)")
    ap.add_argument("--model", default=MODEL_REF, help=f"model reference for every side (default {MODEL_REF})")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM side")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path (default bench/results/generate.json)")
    ap.add_argument("--vllm-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, value in QUICK.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.prompts <= 96:
        ap.error("--prompts must be between 1 and 96 (48 train prompts in each bundled set)")
    if args.rounds < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        ap.error("--rounds, --max-new-tokens and --batch-size must be >= 1")
    if args.baseline_prompts is None:
        args.baseline_prompts = args.prompts
    if not 1 <= args.baseline_prompts <= args.prompts:
        ap.error("--baseline-prompts must be between 1 and --prompts")
    if args.extrapolate and args.baseline_prompts == args.prompts:
        ap.error("--extrapolate only makes sense with --baseline-prompts smaller than --prompts")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.vllm_child:
        run_vllm_child(args)
        return 0
    machine = machine_info()
    model_path = resolve_model(args.model)
    constitution = load_constitution("default")
    prompts = bench_prompts(args.prompts)

    baseline_prompts = prompts
    if args.baseline_prompts < len(prompts):
        # keep the red-team/helpful mix in the subset: interleave the two halves
        red = [p for p in prompts if p.kind == "red-team"]
        rest = [p for p in prompts if p.kind != "red-team"]
        mixed = [x for pair in zip(red, rest) for x in pair] + red[len(rest):] + rest[len(red):]
        baseline_prompts = mixed[: args.baseline_prompts]

    with OtherLoad() as seed_load:
        seed_res = run_seed_loop(model_path, baseline_prompts, constitution, args)
    seed_res["prompts"] = len(baseline_prompts)
    log(f"seed loop: {seed_res['tokens']} tokens in {seed_res['seconds']:.1f}s")
    with OtherLoad() as hf_load:
        hf_res = run_hf_stage(model_path, prompts, constitution, args)
    log(f"cai generate stage (hf): {hf_res['tokens']} tokens in {hf_res['seconds']:.1f}s")
    shares = {"seed_loop": seed_load.share, "hf": hf_load.share}
    vllm_res, vllm_where = None, "skipped (--no-vllm)"
    if not args.no_vllm:
        with OtherLoad() as vllm_load:
            vllm_res, vllm_where = run_vllm_stage(args, argv)
        if vllm_res:
            log(f"cai generate stage (vllm): {vllm_res['tokens']} tokens in {vllm_res['seconds']:.1f}s")
            shares["vllm"] = vllm_load.share
    for warning in finish_machine(machine, shares):
        log(f"warning: {warning}: figures are disturbed; rerun on a quiet machine before quoting them")

    extrap = None
    if args.extrapolate:
        scale = len(prompts) / len(baseline_prompts)
        extrap = {"tokens": seed_res["tokens"] * scale, "seconds": seed_res["seconds"] * scale}

    seed_tps = rate(seed_res["tokens"], seed_res["seconds"])
    hf_tps = rate(hf_res["tokens"], hf_res["seconds"])
    print_table(machine, args, len(prompts), seed_res, hf_res, extrap, vllm_res)
    vllm_tps = rate(vllm_res["tokens"], vllm_res["seconds"]) if vllm_res else None

    result = {
        "machine": machine,
        "command": command_line(argv, "bench/generate.py"),
        "date": now_iso(),
        "model": args.model,
        "device": DEVICE,
        "prompts": len(prompts),
        "baseline_prompts": len(baseline_prompts),
        "rounds": args.rounds,
        "steps_per_prompt": 1 + 2 * args.rounds,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "dtype": DTYPE,
        "few_shot": 0,
        "seed": args.seed,
        "seed_loop_tok_s": round(seed_tps, 2),
        "hf_tok_s": round(hf_tps, 2),
        "ratio_hf_vs_seed": ratio(hf_tps, seed_tps),
        "seed_loop_tokens": seed_res["tokens"],
        "hf_tokens": hf_res["tokens"],
        "seed_loop_s": round(seed_res["seconds"], 3),
        "hf_s": round(hf_res["seconds"], 3),
        "seed_loop_calls": seed_res["calls"],
        "hf_calls": hf_res["calls"],
        "seed_loop_prompt_tokens": seed_res["prompt_tokens"],
        "hf_prompt_tokens": hf_res["prompt_tokens"],
        "seed_loop_steps": seed_res["steps"],
        "hf_steps": hf_res["steps"],
        "hf_prefix_reuse_rate": hf_res.get("prefix_reuse_rate"),
        "seed_loop_extrapolated": (
            {"prompts": len(prompts), "tokens": round(extrap["tokens"]), "seconds": round(extrap["seconds"], 3)} if extrap else None
        ),
        "vllm_tok_s": round(vllm_tps, 2) if vllm_tps else None,
        "ratio_vllm_vs_seed": ratio(vllm_tps, seed_tps) if vllm_tps else None,
        "ratio_vllm_vs_hf": ratio(vllm_tps, hf_tps) if vllm_tps else None,
        "vllm_tokens": vllm_res["tokens"] if vllm_res else None,
        "vllm_s": round(vllm_res["seconds"], 3) if vllm_res else None,
        "vllm_start_s": vllm_res["start_s"] if vllm_res else None,
        "vllm_version": vllm_res["vllm"] if vllm_res else None,
        "vllm_compiled": vllm_res["compiled"] if vllm_res else None,
        "vllm_steps": vllm_res["steps"] if vllm_res else None,
        "vllm_prefix_reuse_rate": vllm_res.get("prefix_reuse_rate") if vllm_res else None,
        "vllm_python": vllm_where,
    }
    write_json_atomic(args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
