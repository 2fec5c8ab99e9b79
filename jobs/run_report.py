"""The run report: one page for a whole run, as self-contained HTML (charts embedded as PNG) and Markdown.

`collect()` reads what the stages left in the store (run.json, each evaluation's report.json and
samples.jsonl, the train metrics, the generate and judge counts); `render_html()`/`render_md()` are
pure functions of that. The controller writes both at the end of every run; `cai report RUN` writes
them again, or to a folder.
"""

from __future__ import annotations

import base64
import html
import io
import zlib
from dataclasses import dataclass, field
from typing import Any

from .model_card import RATES, fmt_num, fmt_tax
from .uncertainty import CAPABILITY_SCORES, fmt_interval, wilson

VARIANTS = [("no_system", "no system prompt"), ("constitution_system", "constitution as system prompt"),
            ("no_system_jailbreak", "jailbreak-wrapped"), ("constitution_system_jailbreak", "wrapped + constitution")]
PAIRS = 10


@dataclass
class Evaluation:
    label: str  # "base", "round 1"
    round: int
    quality: float | None
    report: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunData:
    state: dict[str, Any]
    evaluations: list[Evaluation]
    metrics: dict[int, list[dict[str, Any]]]  # round -> train metrics rows
    generate: dict[int, dict[str, Any]]  # round -> generate counts
    judge: dict[int, dict[str, Any]]  # round -> judge summary


def collect(store, run_id: str) -> RunData:
    from .runs import read_state

    state = read_state(store, run_id)

    def read(key: str, rows: bool = False):
        if not store.exists(key):
            return [] if rows else None
        return list(store.iter_jsonl(key)) if rows else store.read_json(key)

    evaluations = []
    base_out = f"runs/{run_id}/base/evaluate"
    if read(f"{base_out}/report.json"):
        evaluations.append(Evaluation("base", 0, (state.get("base") or {}).get("quality"), read(f"{base_out}/report.json"),
                                      read(f"{base_out}/samples.jsonl", rows=True)))
    metrics, generate, judge = {}, {}, {}
    for rnd in state.get("rounds", []):
        r, stages = rnd["round"], rnd.get("stages", {})
        if "evaluate" in stages and read(f"{stages['evaluate']['output']}/report.json"):
            out = stages["evaluate"]["output"]
            evaluations.append(Evaluation(f"round {r}", r, rnd.get("quality"), read(f"{out}/report.json"), read(f"{out}/samples.jsonl", rows=True)))
        if "train" in stages:
            metrics[r] = read(f"{stages['train']['output']}/metrics.jsonl", rows=True)
        if "generate" in stages:
            generate[r] = stages["generate"].get("counts") or {}
        if "judge" in stages:
            judge[r] = read(f"{stages['judge']['output']}/summary.json") or {}
    return RunData(state, evaluations, metrics, generate, judge)


# --- the figures ------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def charts(data: RunData) -> dict[str, bytes]:
    """name -> PNG: rates per round with their intervals, and the training curves."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    out: dict[str, bytes] = {}
    evals = data.evaluations
    if evals:
        fig = Figure(figsize=(7, 3.2))
        ax = fig.subplots()
        x = list(range(len(evals)))
        for key, label in [r for r in RATES if r[0] not in ("harmless_rate_judge", "harmless_rate_classifier")]:
            pts = [(i, (e.report.get("variants", {}).get("no_system") or {}).get("intervals", {}).get(key)) for i, e in enumerate(evals)]
            pts = [(i, s) for i, s in pts if s]
            if pts:
                ax.errorbar([i for i, _ in pts], [100 * s["rate"] for _, s in pts],
                            yerr=[[100 * (s["rate"] - s["lo"]) for _, s in pts], [100 * (s["hi"] - s["rate"]) for _, s in pts]],
                            marker="o", capsize=3, label=label)
        q = [(i, e.quality) for i, e in enumerate(evals) if e.quality is not None]
        if q:
            ax.plot([i for i, _ in q], [100 * v for _, v in q], "k--", marker="s", label="quality")
        ax.set_xticks(x, [e.label for e in evals])
        ax.set_ylabel("% (95% interval)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc="best")
        ax.set_title("Scores per round (no system prompt)")
        out["rounds"] = _png(fig)
    for r, rows in sorted(data.metrics.items()):
        phases = list(dict.fromkeys(row["phase"] for row in rows))  # in training order: sft, then dpo
        if not phases:
            continue
        fig = Figure(figsize=(7, 2.8))
        axes = fig.subplots(1, len(phases), squeeze=False)[0]
        for ax, phase in zip(axes, phases):
            mine = [row for row in rows if row["phase"] == phase]
            ax.plot([row["step"] for row in mine], [row["loss"] for row in mine], label="loss")
            if any("rewards/margins" in row for row in mine):
                ax.plot([row["step"] for row in mine if "rewards/margins" in row],
                        [row["rewards/margins"] for row in mine if "rewards/margins" in row], label="reward margin")
            ax.set_title(f"round {r} {phase}")
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        out[f"train-round-{r}"] = _png(fig)
    return out


# --- the tables -------------------------------------------------------------------------------------
def _rate(report: dict, variant: str, key: str) -> str:
    return fmt_interval(((report.get("variants", {}).get(variant) or {}).get("intervals") or {}).get(key)) if report else "n/a"


def rounds_table(data: RunData) -> list[list[str]]:
    rows = [["", "quality", *[label for _, label in RATES]]]
    for e in data.evaluations:
        rows.append([e.label, "n/a" if e.quality is None else f"{e.quality:.3f}", *[_rate(e.report, "no_system", k) for k, _ in RATES]])
    return rows


def ablation_table(e: Evaluation) -> list[list[str]]:
    present = [(v, label) for v, label in VARIANTS if v in e.report.get("variants", {})]
    rows = [["metric", *[label for _, label in present]]]
    for key, label in RATES:
        cells = [_rate(e.report, v, key) for v, _ in present]
        if any(c != "n/a" for c in cells):
            rows.append([label, *cells])
    return rows


def tax_table(e: Evaluation) -> list[list[str]]:
    tax = (e.report.get("alignment_tax") or {}).get("no_system") or {}
    rows = [["benchmark", "base", e.label, "tax"]]
    capability = [(n, r) for n, r in sorted((tax.get("per_benchmark") or {}).items()) if n in CAPABILITY_SCORES]
    harness = sorted((((e.report.get("harness") or {}).get("tax") or {}).get("per_benchmark") or {}).items())
    for name, r in capability + harness:
        rows.append([name, fmt_num(r.get("base")), fmt_num(r.get("aligned")), fmt_tax(r.get("tax_pct"), r.get("ci"))])
    if tax.get("capability_average_pct") is not None:
        rows.append(["average", "", "", fmt_tax(tax["capability_average_pct"], tax.get("capability_average_ci"))])
    return rows


def generate_table(data: RunData) -> list[list[str]]:
    rows = [["round", "prompts", "principles used", "revisions kept", "unchanged", "empty", "copied the critique", "red-team refusals"]]
    for r, c in sorted(data.generate.items()):
        used = ", ".join(f"{k} {v}" for k, v in sorted((c.get("principles") or {}).items(), key=lambda kv: -kv[1]))
        rows.append([str(r), str(c.get("prompts", "")), used, str(c.get("revisions_kept", "")), str(c.get("revisions_unchanged", "")),
                     str(c.get("revisions_empty", "")), str(c.get("revisions_copy_critique", "")), str(c.get("red_team_final_refusals", ""))])
    return rows


def judge_table(data: RunData) -> list[list[str]]:
    rows = [["round", "pairs judged", "agreed in both orders", "position consistency", "pairs kept", "by source"]]
    for r, s in sorted(data.judge.items()):
        n, k = s.get("pairs_judged", 0), s.get("order_agreements", 0)
        ci = fmt_interval({"rate": k / n, **dict(zip(("lo", "hi"), wilson(k, n))), "n": n}) if n else "n/a"
        rows.append([str(r), str(n), str(k), ci, str(s.get("pairs_kept", "")), ", ".join(f"{a} {b}" for a, b in sorted((s.get("pairs_by_source") or {}).items()))])
    return rows


def reply_pairs(data: RunData, n: int = PAIRS) -> list[dict[str, str]]:
    """Base vs last-round replies to the same held-out prompts (no system prompt), half harmful, half benign,
    picked by a hash of the item id: the same pairs every time, not the flattering ones."""
    if len(data.evaluations) < 2 or data.evaluations[0].round != 0:
        return []
    base, last = data.evaluations[0], data.evaluations[-1]

    def plain(e: Evaluation, s: str) -> dict[str, dict]:
        return {r["id"]: r for r in e.samples if r.get("variant") == "no_system" and r.get("set") == s}

    out = []
    for s in ("harmful", "benign"):
        b, a = plain(base, s), plain(last, s)
        ids = sorted(set(b) & set(a), key=lambda i: zlib.crc32(i.encode()))[: n // 2]
        out += [{"set": s, "id": i, "prompt": a[i].get("prompt", ""), "base": b[i].get("response", ""), "aligned": a[i].get("response", ""),
                 "label": last.label} for i in ids]
    return out


# --- rendering ------------------------------------------------------------------------------------------
def _summary(data: RunData) -> list[tuple[str, str]]:
    s = data.state
    result = s.get("result") or {}
    return [("run", s.get("run_id", "?")), ("status", s.get("status", "?")), ("model", str((s.get("config") or {}).get("model", "?"))),
            ("constitution", str(s.get("constitution", "?"))), ("prompts", str(s.get("prompts", "?"))),
            ("rounds", f"{len(s.get('rounds', []))}/{s.get('max_rounds', '?')}"), ("created", s.get("created_at", "?")),
            ("result", ("the base model (no round beat it)" if not result.get("round") else f"round {result['round']} ({result.get('model')})")
             if result else "none yet"),
            *[(f"after round {d['round']}", f"{d['decision']}: {d['reason']}") for d in s.get("decisions", [])]]


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(rows: list[list[str]]) -> str:
    def cell(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    return "\n".join(["| " + " | ".join(cell(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0]),
                      *["| " + " | ".join(cell(c) for c in r) + " |" for r in rows[1:]]])


def sections(data: RunData) -> list[tuple[str, str, list[list[str]] | None]]:
    """(title, note, table) in page order; shared by the HTML and the Markdown."""
    last = data.evaluations[-1] if data.evaluations else None
    out: list[tuple[str, str, list[list[str]] | None]] = [
        ("Scores per round", "No system prompt; rates with 95% Wilson intervals and their n.", rounds_table(data) if data.evaluations else None)]
    if last is not None:
        out.append((f"Four columns ({last.label})", "Without and with the constitution as a system prompt, plain and jailbreak-wrapped.", ablation_table(last)))
        if last.round:
            out.append((f"Alignment tax ({last.label} vs base)", "Capability lost vs the base model; positive = worse; 95% paired bootstrap.", tax_table(last)))
    if data.generate:
        out.append(("Critique and revision", "Principle draws and what became of the revisions.", generate_table(data)))
    if data.judge:
        out.append(("The judge", "Position consistency: the share of pairs the judge ranked the same in both orders (a guessing judge's pairs are not trained on).", judge_table(data)))
    return out


CSS = ("body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}"
       "th{background:#f3f3f3}.pair td{white-space:pre-wrap;max-width:420px}img{max-width:100%}code{background:#f6f6f6}")


def render_html(data: RunData, figures: dict[str, bytes]) -> str:
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>cai-jobs run {html.escape(data.state.get('run_id', ''))}</title>"
             f"<style>{CSS}</style></head><body><h1>Run {html.escape(data.state.get('run_id', ''))}</h1>",
             _html_table([["", ""], *[[k, v] for k, v in _summary(data)]])]
    for name, png in figures.items():
        if name == "rounds":
            parts.append(f"<img alt='scores per round' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    for title, note, rows in sections(data):
        if rows:
            parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>{_html_table(rows)}")
    train = [(n, p) for n, p in figures.items() if n.startswith("train-")]
    if train:
        parts.append("<h2>Training curves</h2><p>Loss and DPO reward margin per step (metrics.jsonl).</p>")
        parts += [f"<img alt='{n}' src='data:image/png;base64,{base64.b64encode(p).decode()}'>" for n, p in train]
    pairs = reply_pairs(data)
    if pairs:
        parts.append(f"<h2>Base vs {html.escape(pairs[0]['label'])}: {len(pairs)} replies</h2><p>Held-out prompts picked by a hash of their id.</p>")
        rows = "".join(f"<tr class=pair><td>{html.escape(p['set'])} <code>{html.escape(p['id'])}</code><br>{html.escape(p['prompt'])}</td>"
                       f"<td>{html.escape(p['base'])}</td><td>{html.escape(p['aligned'])}</td></tr>" for p in pairs)
        parts.append(f"<table><thead><tr><th>prompt</th><th>base</th><th>{html.escape(pairs[0]['label'])}</th></tr></thead><tbody>{rows}</tbody></table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def render_md(data: RunData, figure_files: dict[str, str]) -> str:
    lines = [f"# Run {data.state.get('run_id', '')}", "", _md_table([["", ""], *[[k, v] for k, v in _summary(data)]]), ""]
    if "rounds" in figure_files:
        lines += [f"![scores per round]({figure_files['rounds']})", ""]
    for title, note, rows in sections(data):
        if rows:
            lines += [f"## {title}", "", note, "", _md_table(rows), ""]
    train = [(n, f) for n, f in figure_files.items() if n.startswith("train-")]
    if train:
        lines += ["## Training curves", "", *[f"![{n}]({f})" for n, f in train], ""]
    pairs = reply_pairs(data)
    if pairs:
        lines += [f"## Base vs {pairs[0]['label']}: {len(pairs)} replies", "",
                  _md_table([["prompt", "base", pairs[0]["label"]], *[[f"{p['set']} `{p['id']}`: {p['prompt']}", p["base"], p["aligned"]] for p in pairs]]), ""]
    return "\n".join(lines)


def write_run_report(store, run_id: str) -> tuple[str, str]:
    """runs/<id>/report.html (self-contained) and report.md with its charts in runs/<id>/report/."""
    data = collect(store, run_id)
    figures = charts(data)
    files = {name: f"report/{name}.png" for name in figures}
    for name, png in figures.items():
        store.write_bytes(f"runs/{run_id}/{files[name]}", png)
    store.write_text(f"runs/{run_id}/report.md", render_md(data, files))
    store.write_text(f"runs/{run_id}/report.html", render_html(data, figures))
    return f"runs/{run_id}/report.html", f"runs/{run_id}/report.md"
