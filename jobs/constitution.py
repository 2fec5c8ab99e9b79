"""Constitutions: principles as data, loaded from YAML and validated with one-line errors."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .errors import ConfigError
from .schema import StrictModel, load_file

Scope = Literal["red-team", "ordinary", "all"]
NAME_RE = r"^[a-z0-9][a-z0-9_-]*$"

#: the shipped constitutions: package data (`jobs/constitutions/`), so a plain `pip install cai-jobs` has them
#: (the repository's top-level `constitutions` is a link to it, for paths in docs and configs)
SHIPPED_DIR = Path(__file__).resolve().parent / "constitutions"


class Principle(StrictModel):
    name: str = Field(pattern=NAME_RE, description="Short unique id, e.g. `harmless`.")
    critique: str = Field(min_length=1, description="Critique request: how the last response falls short of this principle.")
    revision: str = Field(min_length=1, description="Revision request: rewrite the response to satisfy the principle.")
    comparison: str = Field(min_length=1, description="The judge's question, answered by choosing (A) or (B).")
    scope: Scope = Field("all", description="Prompt kind this principle is sampled for: red-team, ordinary or all.")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="Relative sampling weight (a finite number above 0).")
    revision_prefill: list[str] = Field(
        default_factory=list, description="Openings a revision starts from, one drawn per candidate: the reviser continues "
        "the text (e.g. `I can't help you`). A model too small to follow the revision request still completes a started "
        "refusal, and in its own words about the request. Empty: the reviser writes from scratch.",
    )

    def applies_to(self, kind: str) -> bool:
        return self.scope == "all" or self.scope == kind


class FewShotExample(StrictModel):
    principle: str = Field(description="Name of the principle this worked example demonstrates.")
    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)


class Constitution(StrictModel):
    name: str = Field(pattern=NAME_RE)
    description: str = ""
    principles: list[Principle] = Field(min_length=1)
    few_shot: list[FewShotExample] = Field(default_factory=list)
    system_prompt: str | None = Field(
        None, description="The constitution as a system prompt, for measuring prompt-level guardrails; "
        "default: built from the revision requests."
    )

    @field_validator("principles", mode="before")
    @classmethod
    def _no_blank_text(cls, principles):
        for p in principles if isinstance(principles, list) else []:
            for key in ("critique", "revision", "comparison"):
                if isinstance(p, dict) and isinstance(p.get(key), str) and not p[key].strip():
                    raise ValueError(f"principle {p.get('name', '?')!r}: {key} is blank; write the request text")
        return principles

    @field_validator("principles")
    @classmethod
    def _unique_names(cls, principles: list[Principle]) -> list[Principle]:
        seen: set[str] = set()
        for p in principles:
            if p.name in seen:
                raise ValueError(f"duplicate principle name {p.name!r}; give each principle a unique name")
            seen.add(p.name)
        return principles

    @model_validator(mode="after")
    def _few_shot_refs(self) -> "Constitution":
        names = {p.name for p in self.principles}
        for i, ex in enumerate(self.few_shot):
            if ex.principle not in names:
                raise ValueError(
                    f"few_shot[{i}].principle {ex.principle!r} names no principle; use one of {sorted(names)}"
                )
        return self

    def principle(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        raise KeyError(name)

    def for_kind(self, kind: str) -> list[Principle]:
        """Principles sampled for a prompt kind; all of them when none is scoped to it."""
        chosen = [p for p in self.principles if p.applies_to(kind)]
        return chosen or list(self.principles)

    def as_system_prompt(self) -> str:
        """The constitution as a system prompt (used to tell prompt-level guardrails from alignment)."""
        if self.system_prompt and self.system_prompt.strip():
            return self.system_prompt.strip()
        lines = [f"Follow these principles ({self.name}):"]
        lines += [f"- {p.revision}" for p in self.principles]
        return "\n".join(lines)


def sample_principle(constitution: Constitution, kind: str, seed: int, prompt_id: str, step: int) -> Principle:
    """Weighted draw that depends only on (seed, prompt, step): independent of batching and sharding."""
    pool = constitution.for_kind(kind)
    rng = random.Random(f"{seed}:{prompt_id}:{step}")
    return rng.choices(pool, weights=[p.weight for p in pool], k=1)[0]


def resolve_path(ref: str | Path) -> Path:
    """A file path, or the name of a shipped constitution (`default`, `telehealth`, ...)."""
    path = Path(ref)
    if path.is_dir():
        raise ConfigError(f"{ref}: is a directory, not a constitution file; give the YAML file's path or a shipped name")
    if path.exists():
        return path
    if re.fullmatch(NAME_RE, str(ref)):
        shipped = SHIPPED_DIR / f"{ref}.yaml"
        if shipped.exists():
            return shipped
    raise ConfigError(f"{ref}: constitution not found; give a YAML path or a shipped name ({', '.join(shipped_names())})")


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")) if SHIPPED_DIR.is_dir() else []


def load_constitution(ref: str | Path) -> Constitution:
    return load_file(Constitution, resolve_path(ref))
