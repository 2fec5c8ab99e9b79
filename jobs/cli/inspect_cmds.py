"""Looking things up: `cai config show|validate|schema`, `constitution validate|show`, `model pull`,
`rollout history|undo` (the promoted model, as kubectl's rollout verbs treat a Deployment's revisions)."""

from __future__ import annotations

import argparse
import sys

from ..errors import CaiError
from .common import emit, load_config, open_arg_store


def cmd_config_show(args: argparse.Namespace) -> int:
    """The config a run would use: the file, every --set, and every default filled in."""
    config = load_config(args)
    emit(config.model_dump(mode="json"), args.output or "yaml")
    return 0


def _validate(files, load, describe) -> int:
    """`ok` or one error line per file; exit 2 when any failed (shared by config and constitution)."""
    failed = 0
    for f in files:
        try:
            print(f"{f}: ok ({describe(load(f))})")
        except CaiError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    from ..config import load_run_config

    return _validate(args.files, lambda f: load_run_config(f, args.set),
                     lambda c: f"{c.name}: model {c.model}, constitution {c.constitution}, stages {', '.join(c.stages)}, {c.rounds} round(s)")


def cmd_config_schema(args: argparse.Namespace) -> int:
    """The run config's JSON Schema (for editors and CI checks of config files)."""
    from ..config import RunConfig

    emit(RunConfig.model_json_schema(), args.output or "json")
    return 0


def cmd_constitution_validate(args: argparse.Namespace) -> int:
    from ..constitution import load_constitution

    return _validate(args.files, load_constitution,
                     lambda c: f"{c.name}, {len(c.principles)} principles, {len(c.few_shot)} few-shot examples")


def cmd_constitution_show(args: argparse.Namespace) -> int:
    from ..constitution import load_constitution

    c = load_constitution(args.file)
    if args.output:
        emit(c.model_dump(mode="json"), args.output)
        return 0
    print(f"{c.name}: {c.description}")
    shares = {}
    for kind in ("red-team", "ordinary"):
        pool = c.for_kind(kind)
        total = sum(p.weight for p in pool)
        shares[kind] = {p.name: p.weight / total for p in pool}
    for p in c.principles:
        share = ", ".join(f"{shares[k].get(p.name, 0):.0%} of {k} draws" for k in shares)
        print(f"\n- {p.name}  (scope {p.scope}, weight {p.weight:g}: {share})")
        print(f"    critique:   {p.critique}")
        print(f"    revision:   {p.revision}")
        print(f"    comparison: {p.comparison}")
    if c.few_shot:
        print(f"\nfew-shot examples: {len(c.few_shot)} ({', '.join(e.principle for e in c.few_shot)})")
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    """Resolve a model reference into the local cache (the bundled model is converted once) and print its directory."""
    from ..models import resolve_model

    print(resolve_model(args.ref))
    return 0


def cmd_rollout_history(args: argparse.Namespace) -> int:
    from ..promotion import as_json, format_history, read_pointer

    store = open_arg_store(args)
    pointer = read_pointer(store)
    if pointer is None:
        if args.output:
            emit({"current": None, "history": []}, args.output)
        else:
            print(f"no promoted model in {store.uri_for('models')} yet; `cai realign -c CONFIG --store {store.uri}` promotes one")
        return 0
    emit(as_json(pointer), args.output) if args.output else print(format_history(pointer))
    return 0


def cmd_rollout_undo(args: argparse.Namespace) -> int:
    from ..promotion import rollback

    entry = rollback(open_arg_store(args), args.to, args.reason)
    print(f"entry {entry.seq}: {entry.model} is current again ({entry.reason})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A Hub-ready folder (model with its full card, datasets as Parquet, the report); --hub uploads it."""
    import tempfile
    from pathlib import Path

    from ..export import export_run, upload
    from .common import run_ref

    from ..errors import ConfigError
    from ..export import check_repo

    if args.to is None and not args.hub:
        raise ConfigError("cai export: nothing to do; give --to DIR (a folder) and/or --hub ORG/NAME (an upload)")
    if args.hub:
        check_repo(args.hub)  # before anything is written
    store = open_arg_store(args)
    run_id = run_ref(store, args.run)
    with tempfile.TemporaryDirectory(prefix="cai-export-") as tmp:
        dest = Path(args.to) if args.to else Path(tmp) / "export"
        exported = export_run(store, run_id, dest, args.round)
        for name, path in exported.parts.items():
            print(f"{name + ':':<8} {path}")
        if args.hub:
            for url in upload(exported, args.hub, private=args.private):
                print(f"uploaded: {url}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The whole run on one page: report.html (self-contained) and report.md, in the store and optionally a folder."""
    from pathlib import Path

    from ..run_report import write_run_report
    from ..store import LocalStore
    from .common import run_ref

    store = open_arg_store(args)
    run_id = run_ref(store, args.run)
    keys = write_run_report(store, run_id)
    for key in keys:
        print(store.uri_for(key))
    if args.to:
        dest = LocalStore(Path(args.to))
        for key in [*keys, *store.list(f"runs/{run_id}/report")]:
            dest.write_bytes(key.split("/", 2)[2], store.read_bytes(key))
        print(f"copied to {Path(args.to) / 'report.html'}")
    return 0
