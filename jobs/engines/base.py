"""The text-engine interface shared by the transformers and vLLM back ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class EngineStats:
    """Running totals, so stages can report tokens/s without timing engines themselves."""

    calls: int = 0
    sequences: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    per_step: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class Engine(Protocol):
    stats: EngineStats

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, desc: str = "generate") -> list[str]:
        """One assistant reply per conversation, in input order."""

    def score(self, prompts: Sequence[str], continuations: Sequence[str], desc: str = "score") -> list[float]:
        """Sum of log-probabilities of each continuation given its (already formatted) prompt."""

    def option_logprobs(self, conversations: Sequence[Conversation], prefix: str, options: Sequence[str], desc: str = "judge") -> list[list[float]]:
        """Next-token log-probabilities of single-token options after the rendered conversation + prefix."""

    def render(self, conversation: Conversation, add_generation_prompt: bool = True) -> str:
        """The conversation as the model sees it (chat template applied)."""


def apply_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]
