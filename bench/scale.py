"""Scale on paper: one round's wall time and device-hours for 1k to 100k prompts on 1 to 64 devices,
projected from a measured run's own per-item figures (its stage.json files) and the controller's overhead.

Each stage's measured time splits into a fixed part (model load, report) and a part per item (prompt,
pair, training row, evaluation item). On N devices:

- generate, judge and evaluate run as N shards (an Indexed Job; outputs do not depend on N:
  tests/test_sharding.py checks byte-identical outputs for N = 1, 2, 4), so the per-item part divides by N;
- train runs N processes (DDP/FSDP); the per-row part divides by N times a scaling efficiency per
  doubling (an assumption, `--train-efficiency`, until a multi-GPU run measures it);
- every stage pays the fixed part, a pod start (`--pod-start-s`, assumed) and the controller's measured
  overhead per stage (bench/results/overhead.json).

A device here is the device the run was measured on: this project's runs so far are 2-core CPU
machines, so the figures are in those units. Run it on a GPU run's store for GPU figures.

    python bench/scale.py --store /tmp/recipe-store3 --run-id smollm2-default-aa37da871f
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

PROMPTS = (1_000, 10_000, 100_000)
DEVICES = (1, 8, 64)
STAGES = ("generate", "judge", "train", "evaluate")


def per_item(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{stage: {fixed_s, per_item_s, items, per_prompt}} from the stages' stage.json (timings and counts).
    `per_prompt` is items per training prompt (training rows grow with the prompts; evaluation items do not)."""
    out: dict[str, dict[str, float]] = {}
    gen = stages["generate"]
    prompts = gen["counts"]["prompts"]
    work = gen["timings"]["total_s"] - gen["timings"].get("model_load_s", 0.0)
    out["generate"] = {"fixed_s": gen["timings"].get("model_load_s", 0.0), "per_item_s": work / prompts, "items": prompts, "per_prompt": 1.0}
    judge = stages["judge"]
    work = judge["timings"]["total_s"] - judge["timings"].get("model_load_s", 0.0)
    out["judge"] = {"fixed_s": judge["timings"].get("model_load_s", 0.0), "per_item_s": work / judge["counts"]["prompts"],
                    "items": judge["counts"]["prompts"], "per_prompt": 1.0}
    train = stages["train"]
    phases = [p for p in ("sft", "dpo", "reward") if f"{p}_s" in train["timings"]]
    rows = sum(train["counts"].get(f"{p}_rows", 0) for p in phases) or 1
    work = sum(train["timings"][f"{p}_s"] for p in phases)
    out["train"] = {"fixed_s": train["timings"]["total_s"] - work, "per_item_s": work / rows, "items": rows, "per_prompt": rows / prompts}
    ev = stages["evaluate"]
    items = sum(ev["counts"].get(k, 0) for k in ("harmful", "benign", "capability_mc", "capability_exact")) or 1
    fixed = ev["timings"].get("model_load_s", 0.0) + ev["timings"].get("report_s", 0.0)
    out["evaluate"] = {"fixed_s": fixed, "per_item_s": (ev["timings"]["total_s"] - fixed) / items, "items": items, "per_prompt": 0.0}
    return out


def project(fig: dict[str, dict[str, float]], prompts: int, devices: int, overhead_s: float, pod_start_s: float,
            train_efficiency: float) -> dict[str, float]:
    """Seconds per stage for one round of `prompts` training prompts on `devices` devices."""
    out = {}
    for stage in STAGES:
        f = fig[stage]
        items = f["items"] if stage == "evaluate" else prompts * f["per_prompt"]
        speedup = devices * (train_efficiency ** math.log2(devices) if stage == "train" else 1.0)
        out[stage] = f["fixed_s"] + pod_start_s + overhead_s + items * f["per_item_s"] / speedup
    return out


def table(fig: dict[str, dict[str, float]], overhead_s: float, pod_start_s: float, train_efficiency: float,
          usd_per_device_hour: float | None) -> tuple[list[str], list[list[Any]]]:
    headers = ["prompts", "devices", "generate min", "judge min", "train min", "evaluate min", "round h", "device-hours",
               "vs 1 device"]
    if usd_per_device_hour:
        headers.append("cost USD")
    rows = []
    for n in PROMPTS:
        one = sum(project(fig, n, 1, overhead_s, pod_start_s, train_efficiency).values())
        for d in DEVICES:
            t = project(fig, n, d, overhead_s, pod_start_s, train_efficiency)
            wall = sum(t.values())
            device_hours = wall * d / 3600  # every stage holds all the devices (shards or processes)
            row = [n, d, *(round(t[s] / 60, 1) for s in STAGES), round(wall / 3600, 2), round(device_hours, 1),
                   f"{one / wall:.1f}x"]
            if usd_per_device_hour:
                row.append(round(device_hours * usd_per_device_hour))
            rows.append(row)
    return headers, rows


def read_run(store: Path, run_id: str, round_: int = 1) -> dict[str, dict[str, Any]]:
    base = store / "runs" / run_id / f"round-{round_}"
    return {s: json.loads((base / s / "stage.json").read_text()) for s in STAGES}


def controller_overhead_s(path: Path = common.RESULTS / "overhead.json") -> float:
    """The local controller's measured overhead per stage (run wall minus the stages' own time, over 5 stages)."""
    return json.loads(path.read_text())["stores"]["local"]["overhead_s"] / 5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True, help="a local store holding a finished run")
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--pod-start-s", type=float, default=60.0, help="assumed: scheduling and start of a stage pod (cached image)")
    ap.add_argument("--train-efficiency", type=float, default=0.9, help="assumed: training speed kept per doubling of devices")
    ap.add_argument("--usd-per-device-hour", type=float, default=None)
    args = ap.parse_args(argv)
    if not 0 < args.train_efficiency <= 1:
        print("error: --train-efficiency: must be in (0, 1]; 1 = perfect scaling", file=sys.stderr)
        return 2
    try:
        fig = per_item(read_run(args.store, args.run_id, args.round))
    except (OSError, KeyError) as e:
        print(f"error: --store {args.store} --run-id {args.run_id}: no finished round {args.round} there ({e}); "
              "point it at a run whose generate, judge, train and evaluate stages finished", file=sys.stderr)
        return 2
    overhead = controller_overhead_s()
    print("measured per item (this run):")
    print(common.format_table(["stage", "items", "fixed s", "s per item"],
                              [[s, int(fig[s]["items"]), round(fig[s]["fixed_s"], 1), round(fig[s]["per_item_s"], 3)] for s in STAGES]))
    print(f"\ncontroller overhead {overhead:.2f} s a stage (measured); pod start {args.pod_start_s:g} s and train scaling "
          f"{args.train_efficiency:g} per doubling (assumed)\n")
    headers, rows = table(fig, overhead, args.pod_start_s, args.train_efficiency, args.usd_per_device_hour)
    print(common.format_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
