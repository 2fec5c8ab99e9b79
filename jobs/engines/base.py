"""The text-engine interface shared by the transformers and vLLM back ends."""

from __future__ import annotations

import time
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
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V came from a prefix cache, not a prefill
    seconds: float = 0.0
    per_step: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def add_time(self, desc: str, start: float) -> float:
        """Book the seconds since `start` (a perf_counter reading) under `desc`; returns them."""
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.per_step[desc] = self.per_step.get(desc, 0.0) + elapsed
        return elapsed


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


# Both engines render and stop the same way, so they feed the model identical token ids and cut
# replies at the same place (tests/test_engine_vllm.py checks that they agree).

TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def render_conversation(tokenizer, conversation: Conversation, add_generation_prompt: bool = True) -> str:
    """The chat template's text; a plain `Role: text` transcript for models without one.

    A conversation that ends with an assistant turn is a prefill: the reply continues that text
    (the engines return only the continuation).
    """
    if add_generation_prompt and conversation and conversation[-1]["role"] == "assistant":
        return render_conversation(tokenizer, conversation[:-1], True) + conversation[-1]["content"]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in conversation)
    return text + ("Assistant:" if add_generation_prompt else "")


def stop_token_ids(tokenizer) -> list[int]:
    """End of turn: the eos token plus the chat template's turn terminator where it differs."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for tok in TURN_END_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)
