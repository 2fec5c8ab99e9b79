"""What the verbs share: where the store is, `--set`, `-o json|yaml`, the run a RUN argument names."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_STORE = "./cai-store"
STORE_ENV = "CAI_STORE"


def add_store(p: argparse.ArgumentParser, from_config: bool = False) -> None:
    where = "the config's `store`, else " if from_config else ""
    p.add_argument("--store", help=f"artifact store: a directory or s3://bucket/prefix (default: ${STORE_ENV}, else {where}{DEFAULT_STORE})")


def add_config(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("-c", "--config", type=Path, required=required, help="run config YAML" + ("" if required else " (default: the built-in defaults)"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.dpo.beta=0.2 --set rounds=2 (YAML values; repeatable)")


def add_output(p: argparse.ArgumentParser, *extra: str) -> None:
    choices = [*extra, "json", "yaml"]
    p.add_argument("-o", "--output", choices=choices, help=f"output format: {', '.join(choices)} (default: a table)")
    p.add_argument("--json", action="store_const", const="json", dest="output", help=argparse.SUPPRESS)  # the old flag


def store_uri(args: argparse.Namespace, config_store: str | None = None) -> str:
    """--store, then $CAI_STORE, then the config's `store` (verbs that read one), then ./cai-store."""
    return getattr(args, "store", None) or os.environ.get(STORE_ENV) or config_store or DEFAULT_STORE


def open_arg_store(args: argparse.Namespace, config_store: str | None = None):
    from ..store import open_store

    return open_store(store_uri(args, config_store))


def load_config(args: argparse.Namespace):
    """The run config of -c with every --set applied, validated once."""
    from ..config import load_run_config

    return load_run_config(args.config, args.set)


def run_ref(store, ref: str) -> str:
    """RUN as given, or `@latest`."""
    from ..runs import resolve_run

    return resolve_run(store, ref)


def emit(obj: Any, fmt: str) -> None:
    """Print as JSON or YAML (what kubectl's -o json|yaml give)."""
    if fmt == "yaml":
        import yaml

        print(yaml.safe_dump(obj, sort_keys=False), end="")
    else:
        print(json.dumps(obj, indent=2))


def table(rows: list[list[str]]) -> str:
    """Columns padded like kubectl's: headers in capitals, three spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
