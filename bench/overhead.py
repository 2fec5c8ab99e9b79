"""Benchmark: controller and store overhead as a share of a demo-like run's wall time.

A whole run (base evaluation, then generate -> judge -> train -> evaluate) goes through the real
controller and the local executor (one `cai stage` subprocess per stage, as in `cai run`). Its stages
time their own work (`timings.total_s` in each `stage.json`, from just before the stage computes to
just after its outputs are written). Overhead = run wall time - the sum of those: everything the
machinery adds around the work.

The overhead is then broken down by replaying its parts on the finished run: a stage process's start
and imports (`python -c "import jobs.cli, jobs.stages.<name>"`), reading the spec, hashing inputs and
outputs for the manifest, writing the manifest, and (what remains) the controller's own work: staging
the inputs, run.json updates, completeness checks, reading reports, copying logs, process exit.

    .venv/bin/python bench/overhead.py            # quick: the demo recipe cut down to ~3 min per store
    .venv/bin/python bench/overhead.py --recipe recipes/demo.yaml   # the demo itself (~15 min per store)
    .venv/bin/python bench/overhead.py --stores local

Stores: `local` (a temp directory) and `s3` (a SeaweedFS server started for the run) when the S3
store (`jobs/store_s3.py`) and its launcher (`tests/s3_server.py`) are in the checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's `jobs` and `bench`
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    RESULTS, OtherLoad, command_line, finish_machine, format_table, log, machine_info, now_iso, print_report_header,
    write_json_atomic,
)

DEFAULT_OUT = RESULTS / "overhead.json"
DEMO_RECIPE = ROOT / "recipes" / "demo.yaml"
TARGET_SHARE = 0.03  # issue #5: controller and store overhead <= 3% of a demo run's wall time
# The demo recipe, cut down so one run takes a few minutes: every stage still runs, on the same model.
QUICK_OVERRIDES: dict[str, Any] = {
    "data": {"train": [{"source": "bundled:red-team", "limit": 4}, {"source": "bundled:helpful", "limit": 4}]},
    "generate": {"max_new_tokens": 32, "critique_max_new_tokens": 32},
    "judge": {},
    "train": {"sft": {"epochs": 1, "max_length": 256}, "dpo": {"epochs": 1, "max_length": 256}},
    "evaluate": {"limit": 4, "max_new_tokens": 32},
}


class StoreUnavailable(Exception):
    """A store kind this checkout cannot run (yet); the benchmark says why and goes on without it."""


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def bench_config(recipe: Path, quick: bool, store_uri: str):
    """The run config: the recipe (cut down when quick), on the given store, under its own name."""
    import yaml

    from jobs.config import RunConfig
    from jobs.schema import parse_data

    data = yaml.safe_load(recipe.read_text())
    if quick:
        data = deep_merge(data, QUICK_OVERRIDES)
    data.update(name="bench-overhead", store=store_uri)
    data.pop("executor", None)  # always the local executor: subprocesses measure what a pod's process costs
    return parse_data(RunConfig, data, str(recipe))


# --------------------------------------------------------------------------- stores


@contextlib.contextmanager
def local_store() -> Iterator[tuple[str, list[int]]]:
    """(store URI, pids of helper processes): a temp directory, no helpers."""
    with tempfile.TemporaryDirectory(prefix="cai-bench-overhead-") as tmp:
        yield str(Path(tmp) / "store"), []


def s3_launcher():
    """A no-argument context manager that runs a SeaweedFS server and yields it (`.env`, `.admin()`).

    Taken from the tests' launcher (tests/s3_server.py): its plain `start_s3_server` when it has one,
    else the generator behind its `s3_server` pytest fixture (same server, same cleanup).
    """
    if importlib.util.find_spec("jobs.store_s3") is None:
        raise StoreUnavailable("jobs/store_s3.py is not in this checkout")
    if not (ROOT / "tests" / "s3_server.py").exists():
        raise StoreUnavailable("tests/s3_server.py (the SeaweedFS launcher) is not in this checkout")
    module = importlib.import_module("tests.s3_server")
    if hasattr(module, "start_s3_server"):
        return module.start_s3_server
    fixture = getattr(module, "s3_server", None)
    if fixture is None:
        raise StoreUnavailable("tests/s3_server.py has neither start_s3_server() nor an s3_server fixture")
    return contextlib.contextmanager(getattr(fixture, "__wrapped__", fixture))


@contextlib.contextmanager
def s3_store() -> Iterator[tuple[str, list[int]]]:
    """A bucket on a SeaweedFS server started for this benchmark, and the server's pid (its CPU time is
    the benchmark's own, not other load); the stage processes' environment points boto3 at it."""
    from jobs.models import cache_dir

    launcher = s3_launcher()
    bucket = f"cai-bench-{os.getpid()}"
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    try:
        with launcher() as server:
            server.admin().create_bucket(Bucket=bucket)
            for key in saved:
                del os.environ[key]
            os.environ.update(server.env)
            yield f"s3://{bucket}/store", [server.proc.pid]
    finally:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(saved)
        shutil.rmtree(cache_dir() / "store" / bucket, ignore_errors=True)  # models the S3 store downloaded


STORES = {"local": local_store, "s3": s3_store}


# --------------------------------------------------------------------------- the run


class TimedExecutor:
    """The local executor, with the wall time of each stage process (start to reaped) recorded."""

    def __init__(self):
        from jobs.executors import LocalExecutor

        self.inner = LocalExecutor()
        self.calls: list[dict[str, Any]] = []

    def run(self, stage: str, spec_uri: str) -> str:
        t0 = time.perf_counter()
        out = self.inner.run(stage, spec_uri)
        self.calls.append({"stage": stage, "spec_uri": spec_uri, "wall_s": time.perf_counter() - t0})
        return out


PROFILE_SCRIPT = """\
import os, sys, time
t1 = time.monotonic()
exec(sys.argv[1])
t2 = time.monotonic()
exec(sys.argv[2])
t3 = time.monotonic()
print(t1, t2, t3, flush=True)
if sys.argv[3] == "fast":
    os._exit(0)
"""


def process_profile(before: str, lazy: str = "pass", fast_exit: bool = False) -> dict[str, float]:
    """What a fresh process costs around its work: interpreter start, running `before` (imports and
    opening the store, done before the work's timer starts), running `lazy` (what the work imports on
    first use, inside its timer), and exit with all of it loaded: `os._exit` as a successful
    `cai stage` exits (`fast_exit`), else the interpreter's teardown (torch's included).
    The faster of two tries: warm page cache, as for every stage after the first."""
    tries = []
    for _ in range(2):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", PROFILE_SCRIPT, before, lazy, "fast" if fast_exit else "teardown"],
                              check=True, capture_output=True, text=True)
        t4 = time.monotonic()  # CLOCK_MONOTONIC is system-wide: the child's stamps compare with ours
        t1, t2, t3 = (float(x) for x in proc.stdout.split())
        tries.append({"start_s": t1 - t0, "imports_s": t2 - t1, "lazy_imports_s": t3 - t2, "exit_s": t4 - t3})
    return min(tries, key=lambda t: sum(t.values()))


def opening(modules: str, store_uri: str) -> str:
    """Code that imports what a process imports before its work and opens the store as it does."""
    return f"import {modules}\nfrom jobs.store import open_store\nopen_store({store_uri!r})"


CONTROLLER_MODULES = "jobs.cli, jobs.controller, jobs.executors"
# What each stage imports inside its own timer, on first use: torch + transformers (the engines); the
# train stage also datasets and trl.
LAZY_MODULES = "import jobs.engines.hf, jobs.models"
LAZY_BY_STAGE = {"train": LAZY_MODULES + ", datasets\n"
                           "from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer"}


def run_once(config) -> dict[str, Any]:
    """Run the config through the controller; wall time, per-stage process times and the final state.

    The controller runs in this process; a `cai run` process's own start, imports and exit are
    measured separately and added to the wall time."""
    from jobs.controller import Controller
    from jobs.store import open_store

    controller = process_profile(opening(CONTROLLER_MODULES, config.store))
    store = open_store(config.store)
    executor = TimedExecutor()
    t0 = time.perf_counter()
    state = Controller(config, store, executor).run()
    process_s = controller["start_s"] + controller["imports_s"] + controller["exit_s"]
    wall = time.perf_counter() - t0 + process_s
    return {"store": store, "state": state, "calls": executor.calls, "wall_s": wall, "controller_process_s": process_s}


def stage_entries(state: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, run.json stage entry) in run order: the base evaluation, then each round's stages."""
    out = [(f"base {name}", entry) for name, entry in (state.get("base") or {}).items() if isinstance(entry, dict) and "status" in entry]
    for rnd in state["rounds"]:
        out += [(f"round {rnd['round']} {name}", entry) for name, entry in rnd["stages"].items()]
    return out


def replay_store_work(store, spec_key: str, manifest_key: str) -> dict[str, float]:
    """Time the store work a stage does outside its own timer, on the finished stage: spec read,
    input and output hashing, package versions, manifest write (the same bytes again)."""
    from jobs.config import StageSpec
    from jobs.manifest import input_hashes, package_versions
    from jobs.schema import parse_data

    t = time.perf_counter()
    spec = parse_data(StageSpec, store.read_json(spec_key), spec_key)
    spec_read = time.perf_counter() - t
    manifest = store.read_json(manifest_key)
    t = time.perf_counter()
    input_hashes(store, spec)
    hash_in = time.perf_counter() - t
    t = time.perf_counter()
    for key in manifest["outputs"]:
        store.sha256(key)
    hash_out = time.perf_counter() - t
    t = time.perf_counter()
    package_versions()
    versions = time.perf_counter() - t
    text = store.read_text(manifest_key)
    t = time.perf_counter()
    store.write_text(manifest_key, text)
    write = time.perf_counter() - t
    return {"spec_read_s": spec_read, "hash_inputs_s": hash_in, "hash_outputs_s": hash_out,
            "package_versions_s": versions, "manifest_write_s": write}


def breakdown(run: dict[str, Any]) -> dict[str, Any]:
    """Stage work vs overhead for one finished run, with the overhead split into its parts."""
    store, state, calls = run["store"], run["state"], run["calls"]
    by_uri = {c["spec_uri"]: c for c in calls}
    profiles: dict[str, dict[str, float]] = {}
    stages = []
    for label, entry in stage_entries(state):
        name = label.split()[-1]
        spec_key = f"{entry['output']}/spec.json"
        call = by_uri.get(store.uri_for(spec_key))
        work = float(entry.get("timings", {}).get("total_s", 0.0))
        if name not in profiles:
            profiles[name] = process_profile(opening(f"jobs.cli, jobs.stages, jobs.stages.{name}", store.uri),
                                             LAZY_BY_STAGE.get(name, LAZY_MODULES), fast_exit=True)
        prof = profiles[name]
        parts = replay_store_work(store, spec_key, entry["manifest"])
        process = call["wall_s"] if call else 0.0
        if call:
            parts.update(start_and_imports_s=prof["start_s"] + prof["imports_s"], exit_s=prof["exit_s"])
            parts["other_s"] = process - work - sum(parts.values())
        stages.append({"stage": label, "status": entry["status"], "work_s": round(work, 3), "process_wall_s": round(process, 3),
                       "overhead_s": round(process - work, 3) if call else 0.0,
                       "lazy_imports_in_work_s": round(prof["lazy_imports_s"], 3) if call else 0.0,
                       **{k: round(v, 4) for k, v in parts.items()}})
    wall = run["wall_s"]
    work = sum(s["work_s"] for s in stages)
    in_processes = sum(s["process_wall_s"] for s in stages)
    outside = wall - in_processes  # everything outside the stage processes
    overhead = wall - work
    lazy = sum(s["lazy_imports_in_work_s"] for s in stages)

    def total(key: str) -> float:
        return sum(s.get(key, 0.0) for s in stages)

    components = {
        "stage process start + imports + opening the store": total("start_and_imports_s"),
        "spec read": total("spec_read_s"),
        "hashing inputs (manifest)": total("hash_inputs_s"),
        "hashing outputs (manifest)": total("hash_outputs_s"),
        "package versions (manifest)": total("package_versions_s"),
        "manifest write": total("manifest_write_s"),
        "stage process exit": total("exit_s"),
        "other in stage processes (checks, logging, pipes)": total("other_s"),
        "cai run process start + imports + store + exit": run["controller_process_s"],
        "controller work (inputs, run.json, checks, reports, logs)": outside - run["controller_process_s"],
    }
    return {
        "wall_s": round(wall, 3),
        "stage_work_s": round(work, 3),
        "overhead_s": round(overhead, 3),
        "overhead_share": round(overhead / wall, 4) if wall else None,
        "lazy_imports_in_work_s": round(lazy, 3),
        "overhead_share_with_lazy_imports": round((overhead + lazy) / wall, 4) if wall else None,
        "components_s": {k: round(v, 3) for k, v in components.items()},
        "stages": stages,
        "status": state["status"],
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the demo recipe cut down to a few minutes per store (the default)")
    size.add_argument("--recipe", type=Path, help="run this recipe as it is (recipes/demo.yaml gives the target's figure)")
    ap.add_argument("--stores", default="local,s3", help="comma-separated: local, s3 (default local,s3; s3 is skipped with a "
                                                         "note when this checkout cannot run it)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path (default bench/results/overhead.json)")
    args = ap.parse_args(argv)
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in args.stores if s not in STORES]
    if unknown or not args.stores:
        ap.error(f"--stores: unknown {unknown}; choose from {', '.join(STORES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    quick = args.recipe is None
    recipe = DEMO_RECIPE if quick else args.recipe
    machine = machine_info()

    from jobs.models import resolve_model

    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    shares: dict[str, float | None] = {}
    for kind in args.stores:
        try:
            with STORES[kind]() as (uri, helper_pids):
                config = bench_config(recipe, quick, uri)
                resolve_model(config.model)  # convert the bundled model before timing (a one-off, not overhead)
                log(f"{kind} store: {'quick ' if quick else ''}{recipe.name} run on {uri}")
                with OtherLoad(helper_pids) as load:
                    run = run_once(config)
                shares[f"{kind}_run"] = load.share
                results[kind] = breakdown(run)
        except StoreUnavailable as e:
            skipped[kind] = str(e)
            log(f"{kind} store: skipped: {e}")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - incl. pytest.fail from the launcher; keep the other store's figures, exit 1
            failed[kind] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log(f"{kind} store: failed: {failed[kind]}\n{traceback.format_exc()}")
    if not results:
        raise SystemExit(f"no store could be measured: {skipped or failed}")

    warnings = finish_machine(machine, shares)
    print_report_header(machine, warnings)
    print(f"run: {'quick (cut-down) ' if quick else ''}{recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe}, "
          f"all stages, local executor (one process per stage)")
    print()
    rows = [[kind, r["wall_s"], r["stage_work_s"], r["overhead_s"], f"{r['overhead_share']:.1%}",
             f"{r['overhead_share_with_lazy_imports']:.1%}", f"<= {TARGET_SHARE:.0%}"] for kind, r in results.items()]
    print(format_table(["store", "run wall s", "stage work s", "overhead s", "overhead share", "incl. lazy imports", "target"], rows))
    for kind, r in results.items():
        print()
        print(f"{kind} store, per stage (work = manifest total_s; overhead = process wall - work):")
        print(format_table(["stage", "work s", "process s", "overhead s", "start+imports s", "exit s", "hash in s", "hash out s",
                            "manifest s", "lazy imports in work s"],
                           [[s["stage"], s["work_s"], s["process_wall_s"], s["overhead_s"], round(s.get("start_and_imports_s", 0), 2),
                             round(s.get("exit_s", 0), 2), round(s["hash_inputs_s"], 3), round(s["hash_outputs_s"], 3),
                             round(s["manifest_write_s"], 4), s["lazy_imports_in_work_s"]] for s in r["stages"]]))
        print(f"{kind} store, overhead by part:")
        print(format_table(["part", "seconds", "share of wall"],
                           [[k, v, f"{v / r['wall_s']:.2%}"] for k, v in r["components_s"].items()]))
    for kind, why in {**skipped, **failed}.items():
        print(f"{kind} store: not measured: {why}")
    if quick:
        print()
        print("note: a quick run is shorter than the demo, so the same fixed costs are a larger share of it; the target "
              "applies to `--recipe recipes/demo.yaml`")
    print("lazy imports in work = torch/transformers (train: also datasets/trl) imported on first use inside a stage's own timer (counted as work "
          "above; 'incl. lazy imports' counts them as overhead)")

    first = next(iter(results.values()))
    result = {
        "machine": machine,
        "command": command_line(argv, "bench/overhead.py"),
        "date": now_iso(),
        "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
        "quick": quick,
        "quick_overrides": QUICK_OVERRIDES if quick else None,
        "target_share": TARGET_SHARE,
        "target_applies": not quick and recipe.resolve() == DEMO_RECIPE.resolve(),
        "local_overhead_share": results["local"]["overhead_share"] if "local" in results else None,
        "s3_overhead_share": results["s3"]["overhead_share"] if "s3" in results else None,
        "ratio": first["overhead_share"],
        "ratio_meaning": "overhead share of the run's wall time (baseline: the stages' own total_s, measured in the same run)",
        "stores": results,
        "stores_skipped": skipped,
        "stores_failed": failed,
    }
    write_json_atomic(args.out, result)
    log(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
