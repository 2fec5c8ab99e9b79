"""Strict pydantic base and a loader that turns any parse/validation failure into one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)

_FIXES = {
    "missing": "add the field",
    "extra_forbidden": "remove it or check its spelling",
    "too_short": "add at least one entry",
    "finite_number": "give a finite number",
    "greater_than": "give a larger value",
    "greater_than_equal": "give a larger value",
    "less_than": "give a smaller value",
    "less_than_equal": "give a smaller value",
    "literal_error": "use one of the values listed",
    "int_parsing": "give a whole number",
    "float_parsing": "give a number",
    "bool_parsing": "give true or false",
    "string_type": "give a string",
}


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


def _printable(text: str) -> str:
    """Keys and names may hold control characters; the error must stay on one line."""
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def _field_path(loc: tuple[Any, ...], data: Any) -> str:
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            # name list entries by their `name` when they have one: principles[2](honesty)
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
                if name:
                    label += f"({_printable(str(name))})"
            parts.append(label)
        else:
            parts.append(("." if parts else "") + _printable(str(item)))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return "".join(parts) or "<top level>"


def format_validation_error(source: str, err: ValidationError, data: Any) -> str:
    """First error only, as `file: field: problem (fix)`; the rest are counted."""
    errors = err.errors(include_url=False)
    first = errors[0]
    path = _field_path(tuple(first["loc"]), data)
    msg = first["msg"]
    if first["type"] == "missing":
        msg = "is required"
    elif first["type"] == "extra_forbidden":
        msg = "is not a known field"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    fix = _FIXES.get(first["type"])
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {path}: {msg}" + (f"; {fix}" if fix else "") + more


def parse_data(model_cls: type[M], data: Any, source: str) -> M:
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, data)) from None


def read_structured(path: str | Path) -> Any:
    """YAML or JSON file -> Python data, with one-line errors for missing files and bad syntax."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}); fix the syntax") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<top level>"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}: invalid YAML ({problem}); fix the syntax (quote strings containing ':')") from None


def load_file(model_cls: type[M], path: str | Path) -> M:
    data = read_structured(path)
    if data is None:
        raise ConfigError(f"{path}: <top level>: file is empty; add the required fields")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: <top level>: expected a mapping, got {type(data).__name__}; write key: value pairs")
    return parse_data(model_cls, data, str(path))
