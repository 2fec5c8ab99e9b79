"""Benchmark: the judge stage's label log-probabilities against asking the judge for a text verdict.

Same model, same pairs, same comparison prompt (`jobs.judging.comparison_messages`). Three sides:

- text verdict, sequential (the baseline, the textbook way): one pair at a time, `model.generate`
  with batch 1, greedy, up to --verdict-tokens new tokens, then the first label in the text is parsed;
  one order per pair, as a text judge is usually asked.
- text verdict, batched: the same prompts through our HF engine's batched `generate` (isolates the
  method from batching).
- logprob (ours): `jobs.stages.judge.judge_pairs`, exactly what the judge stage runs: both orders of
  every pair, the next-token log-probabilities of ' A' and ' B' after `Answer:`, one forward pass each.

pairs/s = pairs / wall seconds of the timed run. Pairs are built before timing: each bundled prompt's
own greedy answer against a needless refusal, shown first on even pairs and second on odd ones.

    .venv/bin/python bench/judge.py               # quick sizes (what `make bench` runs)
    .venv/bin/python bench/judge.py --pairs 64 --verdict-tokens 32
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's `jobs` and `bench`
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BUNDLED_MODEL, RESULTS, OtherLoad, bench_prompts, command_line, finish_machine, format_table, log, machine_info,
    now_iso, print_report_header, rate, ratio, write_json_atomic,
)

QUICK = {"pairs": 32, "batch_size": 32, "verdict_tokens": 16, "answer_tokens": 64}
DEFAULT_OUT = RESULTS / "judge.json"

# A leading label must look like one ("A", "(B)", "A.", "B is ...") and not the article in "A good answer".
_LEADING = re.compile(r"^[\s\"'*]*[(\[]?([AB])(?:[)\].:,;*!]|\s*$|\s*\n|\s+is\b)")
_PAREN = re.compile(r"[(\[]([AB])[)\]]")
_NAMED = re.compile(r"\b(?i:response|option|answer|choice)\s*[(\[]?([AB])(?![A-Za-z0-9])")


def parse_verdict(text: str) -> str | None:
    """The label a text verdict picks: a leading A/B, else the first `(A)`, else 'response B' etc.; None if none."""
    m = _LEADING.match(text)
    if m:
        return m.group(1)
    for pattern in (_PAREN, _NAMED):
        m = pattern.search(text)
        if m:
            return m.group(1)
    return None


def build_pairs(records, answers: list[str], constitution, seed: int) -> tuple[list[dict], list[tuple[int, dict]]]:
    """(traces, pairs) in the judge stage's shapes: one pair per prompt, its answer vs a needless refusal.

    The answer is x on even pairs and y on odd ones, so a judge that always names the first option
    agrees with a content-sensitive one about half the time, not always. The principle is drawn as
    the stage draws it for a prompt without revision rounds.
    """
    from jobs.constitution import sample_principle
    from jobs.stages.judge import JUDGE_STEP, NEEDLESS_REFUSALS

    traces, pairs = [], []
    for i, (rec, answer) in enumerate(zip(records, answers)):
        traces.append({"id": rec.id, "kind": rec.kind, "messages": rec.conversation})
        refusal = NEEDLESS_REFUSALS[i % len(NEEDLESS_REFUSALS)]
        x, y = (answer, refusal) if i % 2 == 0 else (refusal, answer)
        principle = sample_principle(constitution, rec.kind, seed, rec.id, JUDGE_STEP)
        pairs.append((i, {"x": x, "y": y, "principle": principle, "source": "bench"}))
    return traces, pairs


def agreement(text_labels: list[str | None], verdicts: list[Any]) -> dict[str, Any]:
    """How often the text verdict (x shown as A) and the log-prob verdict pick the same response."""
    parsed = [(lab, v) for lab, v in zip(text_labels, verdicts) if lab is not None]
    same = sum((lab == "A") == (v.p_x > 0.5) for lab, v in parsed)
    same_first = sum((lab == "A") == (v.p_x_first > 0.5) for lab, v in parsed)
    n = len(parsed)
    return {
        "pairs": len(text_labels),
        "text_parsed": n,
        "text_unparsed": len(text_labels) - n,
        "agreement": round(same / n, 4) if n else None,
        "agreement_with_logprob_same_order": round(same_first / n, 4) if n else None,
        "text_picks_first_shown": round(sum(lab == "A" for lab, _ in parsed) / n, 4) if n else None,
        "logprob_picks_first_shown_one_order": round(sum(v.p_x_first > 0.5 for v in verdicts) / len(verdicts), 4) if verdicts else None,
        "logprob_order_agreement": round(sum(v.order_agreement for v in verdicts) / len(verdicts), 4) if verdicts else None,
    }


class TextJudgeLoop:
    """The textbook text judge: per pair, render the question, `model.generate` at batch 1, decode, parse."""

    def __init__(self, model_path: str, dtype, device: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.device = torch, device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.prompt_tokens = self.generated_tokens = 0

    def verdict(self, conversation: list[dict[str, str]], max_new_tokens: int) -> str:
        torch = self.torch
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, temperature=None, top_p=None, top_k=None,
                                      eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        new = out[0, ids.shape[1]:].tolist()
        n = next((k + 1 for k, t in enumerate(new) if t == self.eos_id), len(new))
        self.prompt_tokens += ids.shape[1]
        self.generated_tokens += n
        return self.tokenizer.decode(new[:n], skip_special_tokens=True).strip()


def questions(traces: list[dict], pairs: list[tuple[int, dict]]) -> list[list[dict[str, str]]]:
    """The comparison question with x shown as (A): the one order a text judge is asked."""
    from jobs.judging import comparison_messages

    return [comparison_messages(traces[t]["messages"], p["x"], p["y"], p["principle"]) for t, p in pairs]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quick preset (the default sizes); explicit flags still win")
    ap.add_argument("--pairs", type=int, help=f"pairs, one per bundled train prompt, half red-team (max 96; default {QUICK['pairs']})")
    ap.add_argument("--batch-size", type=int, help=f"engine batch size for the batched sides (default {QUICK['batch_size']})")
    ap.add_argument("--verdict-tokens", type=int, help=f"new-token cap of a text verdict (default {QUICK['verdict_tokens']})")
    ap.add_argument("--answer-tokens", type=int, help=f"token cap of the answers being judged (default {QUICK['answer_tokens']})")
    ap.add_argument("--model", default=BUNDLED_MODEL, help=f"model reference (default {BUNDLED_MODEL})")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="default float32")
    ap.add_argument("--skip-batched-text", action="store_true", help="leave out the batched text side")
    ap.add_argument("--seed", type=int, default=0, help="principle-sampling seed (default 0)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path (default bench/results/judge.json)")
    args = ap.parse_args(argv)
    for key, value in QUICK.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 2 <= args.pairs <= 96:
        ap.error("--pairs must be between 2 and 96 (48 train prompts in each bundled set)")
    if min(args.batch_size, args.verdict_tokens, args.answer_tokens) < 1:
        ap.error("--batch-size, --verdict-tokens and --answer-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    machine = machine_info()

    import torch

    from jobs.config import EngineConfig
    from jobs.constitution import load_constitution
    from jobs.engines import SamplingParams, load_engine
    from jobs.models import resolve_model
    from jobs.stages.judge import judge_pairs

    model_path = resolve_model(args.model)
    constitution = load_constitution("default")
    records = bench_prompts(args.pairs)
    engine = load_engine(EngineConfig(backend="hf", dtype=args.dtype, device=args.device, batch_size=args.batch_size), model_path)
    engine.show_progress = False

    log(f"answers to judge: {len(records)} prompts, up to {args.answer_tokens} tokens (not timed)")
    answers = engine.generate([r.conversation for r in records], SamplingParams(max_new_tokens=args.answer_tokens), desc="answers")
    traces, pairs = build_pairs(records, answers, constitution, args.seed)
    qs = questions(traces, pairs)
    n = len(pairs)
    shares: dict[str, float | None] = {}
    sides: dict[str, dict[str, Any]] = {}

    log(f"text verdict, sequential: {n} pairs, batch 1, <= {args.verdict_tokens} new tokens each")
    loop = TextJudgeLoop(model_path, getattr(torch, args.dtype), engine.device)
    loop.verdict([{"role": "user", "content": "Hi"}], 2)  # warm-up, not timed
    loop.prompt_tokens = loop.generated_tokens = 0
    with OtherLoad() as load:
        t0 = time.perf_counter()
        text_seq = [loop.verdict(q, args.verdict_tokens) for q in qs]
        seconds = time.perf_counter() - t0
    shares["text_sequential"] = load.share
    sides["text_sequential"] = {"seconds": seconds, "forward_passes": n, "prompt_tokens": loop.prompt_tokens,
                                "generated_tokens": loop.generated_tokens}
    del loop

    text_bat = None
    if not args.skip_batched_text:
        log(f"text verdict, batched: {n} pairs, batch {args.batch_size}")
        engine.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=2), desc="warm-up")
        before = (engine.stats.prompt_tokens, engine.stats.generated_tokens)
        with OtherLoad() as load:
            t0 = time.perf_counter()
            text_bat = engine.generate(qs, SamplingParams(max_new_tokens=args.verdict_tokens), desc="text verdicts")
            seconds = time.perf_counter() - t0
        shares["text_batched"] = load.share
        sides["text_batched"] = {"seconds": seconds, "forward_passes": n, "prompt_tokens": engine.stats.prompt_tokens - before[0],
                                 "generated_tokens": engine.stats.generated_tokens - before[1]}

    log(f"logprob (judge stage): {n} pairs x 2 orders, batch {args.batch_size}")
    judge_pairs(engine, traces, pairs[:1])  # warm-up, not timed
    before = engine.stats.prompt_tokens
    with OtherLoad() as load:
        t0 = time.perf_counter()
        verdicts = judge_pairs(engine, traces, pairs)
        seconds = time.perf_counter() - t0
    shares["logprob"] = load.share
    sides["logprob"] = {"seconds": seconds, "forward_passes": 2 * n, "prompt_tokens": engine.stats.prompt_tokens - before,
                        "generated_tokens": 0}

    warnings = finish_machine(machine, shares)
    for side in sides.values():
        side["pairs_s"] = round(rate(n, side["seconds"]), 3)
        side["seconds"] = round(side["seconds"], 3)
    labels = [parse_verdict(t) for t in text_seq]
    agree = agreement(labels, verdicts)
    if text_bat is not None:
        agree["text_batched_same_label_as_sequential"] = round(sum(parse_verdict(b) == s for b, s in zip(text_bat, labels)) / n, 4)
    base = sides["text_sequential"]["pairs_s"]

    print_report_header(machine, warnings)
    print(f"model: {args.model}, {args.dtype} on {engine.device}; {n} pairs (answer <= {args.answer_tokens} tokens vs a refusal), "
          f"principles from the default constitution, seed {args.seed}")
    print()
    names = {"text_sequential": "text verdict, sequential (baseline)", "text_batched": "text verdict, batched (hf engine)",
             "logprob": "logprob both orders (judge stage)"}
    rows = [[names[k], 1 if k == "text_sequential" else args.batch_size, s["forward_passes"],
             round(s["prompt_tokens"] / s["forward_passes"]), s["generated_tokens"], s["seconds"], s["pairs_s"],
             f"{s['pairs_s'] / base:.2f}x" if base else None] for k, s in sides.items()]
    print(format_table(["side", "batch", "questions", "prompt tok/q", "gen tokens", "seconds", "pairs/s", "vs baseline"], rows))
    print()
    print(f"agreement (text verdict vs logprob, same side picked): {agree['agreement']} over {agree['text_parsed']} parsed "
          f"text verdicts; {agree['text_unparsed']} unparsed. Text picked the first-shown response in "
          f"{agree['text_picks_first_shown']} of them; logprob's two orders agreed on {agree['logprob_order_agreement']} of pairs.")

    result = {
        "machine": machine,
        "command": command_line(argv, "bench/judge.py"),
        "date": now_iso(),
        "model": args.model,
        "device": engine.device,
        "dtype": args.dtype,
        "pairs": n,
        "batch_size": args.batch_size,
        "verdict_tokens": args.verdict_tokens,
        "answer_tokens": args.answer_tokens,
        "seed": args.seed,
        "text_pairs_s": sides["text_sequential"]["pairs_s"],
        "text_batched_pairs_s": sides["text_batched"]["pairs_s"] if "text_batched" in sides else None,
        "logprob_pairs_s": sides["logprob"]["pairs_s"],
        "ratio_logprob_vs_text": ratio(sides["logprob"]["pairs_s"], base),
        "ratio_logprob_vs_text_batched": ratio(sides["logprob"]["pairs_s"], sides["text_batched"]["pairs_s"]) if "text_batched" in sides else None,
        "ratio": ratio(sides["logprob"]["pairs_s"], base),
        "sides": sides,
        "agreement": agree,
        "text_verdict_examples": text_seq[:3],
    }
    write_json_atomic(args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
