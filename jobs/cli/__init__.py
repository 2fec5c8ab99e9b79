"""`cai`: the command line, with kubectl/Argo habits.

Errors print as one line (`error: <where>: <what>; <fix>`); --debug shows tracebacks. Every read verb
takes `-o json|yaml`, every RUN argument takes `@latest`, and `--store` defaults to `$CAI_STORE`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import CaiError
from . import inspect_cmds as inspect
from . import manage, pipeline
from .common import add_config, add_output, add_store
from .show import format_status, interval_lines

__all__ = ["build_parser", "entry", "format_status", "interval_lines", "main"]

STAGES = ["generate", "judge", "train", "evaluate"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cai-jobs")
    except PackageNotFoundError:  # a source tree on PYTHONPATH
        from .. import __version__

        return __version__


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, help="override the config's `rounds`")
    p.add_argument("--executor", choices=["local", "kubernetes"], help="where stages run; overrides the config's `executor`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="Constitutional AI as batch jobs. `cai <command> -h` for each command.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"cai-jobs {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    # --- start work -------------------------------------------------------------------------------
    p = sub.add_parser("run", help="run rounds of CAI for a config here (re-running resumes)")
    add_config(p)
    add_store(p, from_config=True)
    p.add_argument("--run-id", help="run id (default: derived from the config, so re-running resumes)")
    _run_flags(p)
    p.set_defaults(func=pipeline.cmd_run)

    p = sub.add_parser("resume", help="go on with a run from its stored config (after a failure or `cai cancel`)")
    p.add_argument("run", metavar="RUN", help="run id or @latest")
    add_store(p)
    _run_flags(p)
    p.set_defaults(func=pipeline.cmd_resume)

    p = sub.add_parser("submit", help="run the controller in the cluster as a Job (needs an s3:// store)")
    add_config(p, required=True)
    add_store(p, from_config=True)
    p.add_argument("--run-id", help="run id (default: derived from the config, so resubmitting resumes)")
    p.add_argument("-n", "--namespace", help="namespace (default: the config's, else the kubeconfig context's)")
    p.add_argument("--wait", action="store_true", help="wait for the run to end; exit 0 only if it completed")
    p.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds (the run goes on)")
    p.add_argument("--interval", type=float, default=10.0, help=argparse.SUPPRESS)
    p.set_defaults(func=pipeline.cmd_submit)

    p = sub.add_parser("render", help="print every Kubernetes manifest a run submits (dry run, no cluster)")
    add_config(p)
    add_store(p, from_config=True)
    p.add_argument("--run-id", help="run id (default: derived from the config)")
    p.add_argument("-n", "--namespace", help="namespace written into the manifests (default: the config's, else none)")
    p.add_argument("--controller", action="store_true", help="also print the controller Job, its ConfigMap and RBAC (`cai submit`)")
    p.set_defaults(func=pipeline.cmd_render)

    p = sub.add_parser("realign", help="one realignment tick: rounds from the promoted model, promoted only if the gates pass")
    add_config(p)
    add_store(p, from_config=True)
    _run_flags(p)
    p.add_argument("--force", action="store_true", help="run and decide even when the inputs are unchanged")
    p.set_defaults(func=pipeline.cmd_realign)

    # --- manage runs ------------------------------------------------------------------------------
    p = sub.add_parser("list", aliases=["ls"], help="the runs in a store: id, status, rounds, quality, result, age")
    add_store(p)
    add_output(p, "wide", "name")
    p.set_defaults(func=manage.cmd_list)

    p = sub.add_parser("get", aliases=["status"], help="a run's rounds, stages, scores with intervals, decisions (alias: status)")
    p.add_argument("run", metavar="RUN", help="run id or @latest")
    add_store(p)
    add_output(p)
    p.add_argument("-w", "--watch", action="store_true", help="print again whenever it changes, until the run ends")
    p.add_argument("--interval", type=float, default=manage.WATCH_INTERVAL_S, help="seconds between looks with --watch")
    p.set_defaults(func=manage.cmd_get)

    p = sub.add_parser("logs", help="a stage's logs (-f follows a running stage: the live log here, the pods on Kubernetes)")
    p.add_argument("run", metavar="RUN", help="run id or @latest")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--round", type=int, help="round (default: the latest that ran the stage; 0 = base evaluation)")
    p.add_argument("-f", "--follow", action="store_true", help="stream the log until the stage ends")
    p.add_argument("-n", "--namespace", help="with -f on Kubernetes: the pods' namespace (default: the run's config, else the context's)")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--pod-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    add_store(p)
    p.set_defaults(func=manage.cmd_logs)

    p = sub.add_parser("cancel", help="stop a run: its controller stops its stages and deletes their Jobs, run.json says why")
    p.add_argument("run", metavar="RUN", help="run id or @latest")
    p.add_argument("--reason", default="cancelled by the user", help="recorded in run.json")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the controller to stop (a dead one's lock lapses within ~2.5 min on S3)")
    p.add_argument("-n", "--namespace", help="namespace of the run's Jobs (default: the run's config, else the context's)")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    add_store(p)
    p.set_defaults(func=manage.cmd_cancel)

    p = sub.add_parser("delete", help="delete runs from the store (never a running one, or a promoted model's lineage)")
    p.add_argument("runs", metavar="RUN", nargs="+", help="run ids or @latest")
    add_store(p)
    p.set_defaults(func=manage.cmd_delete)

    p = sub.add_parser("gc", help="delete old finished runs, always keeping promoted models and their lineage")
    p.add_argument("--keep-promoted", action="store_true", default=True, help="keep every run a promoted model came from (always on)")
    p.add_argument("--keep-last", type=int, default=3, help="keep the newest N runs whatever their age (default 3)")
    p.add_argument("--older-than", default="7d", help="delete only runs not updated for this long: 90s, 30m, 12h, 7d (default 7d)")
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    add_store(p)
    add_output(p)
    p.set_defaults(func=manage.cmd_gc)

    p = sub.add_parser("export", help="a run's model (with its model card), datasets (Parquet) and report as a Hub-ready folder; --hub uploads it")
    p.add_argument("run", metavar="RUN", help="run id or @latest")
    p.add_argument("--to", help="folder to write (new or empty)")
    p.add_argument("--round", type=int, help="round whose model to export (default: the run's result)")
    p.add_argument("--hub", metavar="ORG/NAME", help="upload: the model to ORG/NAME, the datasets to ORG/NAME-sft and ORG/NAME-prefs (HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --hub: create the repos private")
    add_store(p)
    p.set_defaults(func=inspect.cmd_export)

    p = sub.add_parser("report", help="the whole run on one page: report.html (charts embedded) and report.md")
    p.add_argument("run", metavar="RUN", help="run id or @latest")
    p.add_argument("--to", help="also copy them into this folder")
    add_store(p)
    p.set_defaults(func=inspect.cmd_report)

    # --- look things up ---------------------------------------------------------------------------
    p = sub.add_parser("config", help="the run config: show (with defaults and --set), validate files, print its JSON Schema")
    csub = p.add_subparsers(dest="action", required=True, metavar="<action>")
    s = csub.add_parser("show", help="the effective config: the file, every --set, every default")
    add_config(s)
    add_output(s)
    s.set_defaults(func=inspect.cmd_config_show)
    s = csub.add_parser("validate", help="check config files; one line per error")
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides to check with them")
    s.set_defaults(func=inspect.cmd_config_validate)
    s = csub.add_parser("schema", help="the run config's JSON Schema")
    add_output(s)
    s.set_defaults(func=inspect.cmd_config_schema)

    p = sub.add_parser("constitution", help="validate or show constitutions")
    csub = p.add_subparsers(dest="action", required=True, metavar="<action>")
    s = csub.add_parser("validate", help="check files; one line per error")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=inspect.cmd_constitution_validate)
    s = csub.add_parser("show", help="principles and sampling shares")
    s.add_argument("file", help="a shipped name (default, telehealth, customer-service) or a YAML path")
    add_output(s)
    s.set_defaults(func=inspect.cmd_constitution_show)

    p = sub.add_parser("model", help="model files: `cai model pull REF` resolves a reference and prints its directory")
    msub = p.add_subparsers(dest="action", required=True, metavar="<action>")
    for name in ("pull", "prepare"):  # `prepare`: the old name, kept working
        m = msub.add_parser(name, **({"help": "resolve a model reference into the local cache (the bundled model is converted once); print its path"} if name == "pull" else {}))
        m.add_argument("ref", nargs="?", default="bundled:smollm2-135m-instruct")
        m.set_defaults(func=inspect.cmd_model_pull)

    p = sub.add_parser("rollout", help="the promoted model: `history` of promotions, `undo` points back to an earlier one")
    rsub = p.add_subparsers(dest="action", required=True, metavar="<action>")
    r = rsub.add_parser("history", help="the current entry and every earlier one")
    add_store(r)
    add_output(r)
    r.set_defaults(func=inspect.cmd_rollout_history)
    _add_undo(rsub, "undo", "make an earlier entry's model current again (a new entry; history is kept)")

    # --- kept working, not shown: the pods' entry point and the old names -------------------------------
    p = sub.add_parser("stage")
    p.add_argument("name", choices=STAGES)
    p.add_argument("--spec", required=True, help="URI of the StageSpec JSON in the store")
    p.add_argument("--shard", type=int, help="shard index of a sharded spec (default: $JOB_COMPLETION_INDEX, as in an Indexed Job)")
    p.add_argument("--merge", action="store_true", help="combine a sharded stage's finished shards into its outputs")
    p.set_defaults(func=pipeline.cmd_stage)

    p = sub.add_parser("models")  # now `cai rollout history`; `cai models rollback` is `cai rollout undo`
    add_store(p)
    add_output(p)
    p.set_defaults(func=inspect.cmd_rollout_history)
    msub = p.add_subparsers(dest="action", metavar="<action>")
    _add_undo(msub, "rollback", None)
    return parser


def _add_undo(sub, name: str, help_text: str | None) -> None:
    r = sub.add_parser(name, **({"help": help_text} if help_text else {}))
    r.add_argument("--to", "--to-revision", dest="to", type=int, metavar="SEQ", help="entry to return to (default: the model the current one replaced)")
    r.add_argument("--reason", help="note recorded in the new entry")
    r.add_argument("--store", default=argparse.SUPPRESS, help="artifact store (default: $CAI_STORE, else ./cai-store)")
    r.set_defaults(func=inspect.cmd_rollout_undo)


def main(argv: list[str] | None = None, fast_exit: bool = False) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        if fast_exit and rc == 0 and args.func is pipeline.cmd_stage:
            # The stage's outputs and manifest are written and closed. Tearing down an interpreter that
            # holds torch, a model and its thread pools takes 0.3-1 s per stage process (measured in
            # bench/overhead.py), which is pure controller overhead: skip it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return rc
    except CaiError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path given on the command line: a file where a folder was expected, no permission...
        if args.debug:
            raise
        print(f"error: {e.filename or args.command}: {e.strerror or e}; check the path", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def entry() -> None:
    """The `cai` console script (and `python -m jobs.cli`, what the local executor runs)."""
    sys.exit(main(fast_exit=True))
