"""The transformers engine: batched, left-padded, length-sorted generation and one-pass scoring."""

from __future__ import annotations

import sys
import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ModelError
from .attention import register as register_gqa_attention
from .attention import wants_gqa_kernel
from .base import Conversation, EngineStats, SamplingParams, apply_stop, render_conversation, stop_token_ids
from .decode import StaticDecoder, positions_from_mask, stop_lengths
from .prefix_cache import BLOCK, PrefixCache

# In a pod or a piped subprocess the bar goes to a log: update it rarely there.
_BAR_INTERVAL = 2 if sys.stderr.isatty() else 15

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    # On CPU, transformers' eager bf16 kernels measured slower than fp32 here (114 vs 132 tok/s,
    # 2 cores with avx512_bf16), and fp32 keeps greedy outputs identical across batch shapes.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def pick_decode(decode: str, device: str, fixed_cache_ok: bool) -> str:
    """`auto`: the compiled fixed-cache loop on CUDA, where kernel-launch overhead dominates; the same loop
    uncompiled elsewhere. On 2 CPU cores (`bench/decode.py`: 32 prompts x 3 steps x 64 tokens, prefix
    reuse on, fp32) transformers' `generate` ran the stage at 174.3 tok/s, the static loop at 191.2 and
    the compiled one at 209.6, all with the same text; compiling took 44-114 s per process (warm or cold
    compile cache), more than it saves in most CPU stages, so it is not the CPU default.
    Models that cannot use a fixed-size cache always use `generate`: those with sliding-window attention
    (the loop keeps full-length K/V) and those transformers does not mark compilable with a static cache
    (`_can_compile_fullgraph`: recurrent and hybrid-cache architectures)."""
    if not fixed_cache_ok:
        return "generate"
    if decode != "auto":
        return decode
    return "compiled" if device.startswith("cuda") else "static"


# Rows of a generate batch that share at least this many opening tokens (a worked example, say) have
# them read once for all; shorter common openings (the system prompt every request starts with) are
# not worth the extra forward pass.
SHARE_MIN_TOKENS = 64


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def shared_prefix_groups(encoded: Sequence[Sequence[int]], max_group: int, min_shared: int = BLOCK) -> list[tuple[int, list[int]]]:
    """Partition questions into (shared length, indices) groups that read a common prefix once.

    In sorted order, questions with long common openings sit next to each other, and a run of
    neighbours shares the minimum of their pairwise neighbour prefixes. A run of m questions sharing
    n tokens saves (m - 1) * n tokens of reading; the partition into runs of at most `max_group` that
    saves the most is found by dynamic programming. That keeps the two orders of one question
    together (they share its whole opening) rather than lumping every question into one group
    around the short system prompt they all start with. Each member keeps at least one token of tail;
    runs sharing fewer than `min_shared` tokens are not worth a second pass and stay single (shared 0).
    """
    n = len(encoded)
    order = sorted(range(n), key=lambda i: list(encoded[i]))
    seqs = [encoded[i] for i in order]
    links = [min(_common_prefix(seqs[k], seqs[k + 1]), len(seqs[k]) - 1, len(seqs[k + 1]) - 1) for k in range(n - 1)]
    best = [0] * (n + 1)  # best[j]: tokens saved by the best partition of seqs[:j]
    start = list(range(n + 1))  # start[j]: where the last run of that partition begins
    for j in range(1, n + 1):
        best[j], start[j] = best[j - 1], j - 1
        shared = None
        for i in range(j - 2, max(j - max_group, 0) - 1, -1):  # run seqs[i:j], two or more members
            shared = links[i] if shared is None else min(shared, links[i])
            if shared < min_shared:
                break
            if best[i] + (j - i - 1) * shared > best[j]:
                best[j], start[j] = best[i] + (j - i - 1) * shared, i
    groups: list[tuple[int, list[int]]] = []
    j = n
    while j > 0:
        i = start[j]
        shared = min(links[i : j - 1]) if j - i > 1 else 0
        groups.append((shared, order[i:j]))
        j = i
    return groups[::-1]


class HFEngine:
    """One loaded model reused across every step of a stage (never reloaded per step)."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 32,
        trust_remote_code: bool = False,
        show_progress: bool = True,
        prefix_cache_gb: float = 0.0,
        decode: str = "auto",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.stats = EngineStats()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=self.dtype, trust_remote_code=trust_remote_code
            ).to(self.device)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{model_path}: cannot load model ({first}); give a local HF directory or bundled:smollm2-135m-instruct") from None
        self.model.eval()
        if wants_gqa_kernel(self.model, self.device):
            self.model.set_attn_implementation(register_gqa_attention())
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = stop_token_ids(self.tokenizer)
        # Only for models whose every layer keeps full-length K/V (sliding windows would truncate it).
        sliding = getattr(self.model.config, "sliding_window", None) and getattr(self.model.config, "use_sliding_window", True)
        self.prefix_cache = PrefixCache(int(prefix_cache_gb * 2**30)) if prefix_cache_gb > 0 and not sliding else None
        fixed_cache_ok = not sliding and bool(getattr(self.model, "_can_compile_fullgraph", False))
        self.decode = pick_decode(decode, self.device, fixed_cache_ok)
        if decode in ("static", "compiled") and self.decode == "generate":
            print(f"[engine] engine.decode: {decode} is not possible for {type(self.model).__name__} "
                  "(sliding-window or non-static cache); using transformers' generate", file=sys.stderr, flush=True)
        self.decoder = StaticDecoder(self.model, compile=self.decode == "compiled") if self.decode != "generate" else None
        if show_progress:  # one line a stage log can be read by, like the vLLM engine's
            print(f"[engine] transformers: {type(self.model).__name__}, {str(self.dtype).replace('torch.', '')} on {self.device}, "
                  f"decode {self.decode}, prefix cache {'on' if self.prefix_cache is not None else 'off'}", file=sys.stderr, flush=True)

    def render(self, conversation: Conversation, add_generation_prompt: bool = True) -> str:
        return render_conversation(self.tokenizer, conversation, add_generation_prompt)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices sorted by length (longest first) so each batch pads little and OOMs show early."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _pad_left(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, desc: str = "generate") -> list[str]:
        texts = [self.render(c) for c in conversations]
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        outputs: list[str] = [""] * len(texts)
        start = time.perf_counter()
        new_tokens = 0
        bar = tqdm(total=len(texts), desc=desc, unit="seq", disable=not self.show_progress, leave=False, mininterval=_BAR_INTERVAL)
        if self.prefix_cache is not None:
            self.prefix_cache.begin_call()
        for b, idx in enumerate(self._batches([len(e) for e in encoded])):
            seqs = [encoded[i] for i in idx]
            past, cols = None, None
            if self.prefix_cache is not None:
                past, lens = self._batch_prefix(seqs)
            if past is None:
                ids, mask = self._pad_left(seqs)
            else:
                ids, mask, cols = self._split_layout(seqs, lens)
            seed = params.seed * 100_003 + b
            if self.decoder is not None:
                gen, lengths, layers, cached_len = self._decode_static(ids, mask, past, params, seed)
            else:
                gen, lengths, layers, cached_len = self._decode_generate(ids, mask, past, params, seed)
            for row, i in enumerate(idx):
                n = lengths[row]
                new_tokens += n
                outputs[i] = apply_stop(self.tokenizer.decode(gen[row, :n].tolist(), skip_special_tokens=True), params.stop).strip()
            if self.prefix_cache is not None:
                if cols is None:  # plain left padding: each row's prompt is its last len(s) columns
                    cols = [list(range(ids.shape[1] - len(s), ids.shape[1])) for s in seqs]
                self._remember(seqs, cols, gen, lengths, layers, cached_len)
            self.stats.prompt_tokens += int(mask.sum())
            bar.update(len(idx))
            elapsed = time.perf_counter() - start
            bar.set_postfix(tok_s=f"{new_tokens / elapsed:.0f}" if elapsed else "-")
        bar.close()
        self._account(desc, start)
        self.stats.calls += 1
        self.stats.sequences += len(texts)
        self.stats.generated_tokens += new_tokens
        return outputs

    def _decode_generate(self, ids: torch.Tensor, mask: torch.Tensor, past, params: SamplingParams, seed: int):
        """transformers' `generate` (growing K/V cache): (new tokens [B, n], per-row lengths through the
        stop token, per-layer (keys, values), columns holding K/V)."""
        from transformers import DynamicCache

        kwargs = dict(max_new_tokens=params.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                      return_dict_in_generate=True)
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None)
        if past is not None:
            kwargs.update(past_key_values=DynamicCache(past, config=self.model.config))
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        gen = out.sequences[:, ids.shape[1] :]
        lengths = stop_lengths(gen, self.stop_ids)
        cache = out.past_key_values
        layers = [(layer.keys, layer.values) for layer in cache.layers] if cache is not None else []
        return gen, lengths, layers, cache.get_seq_length() if cache is not None else 0

    def _decode_static(self, ids: torch.Tensor, mask: torch.Tensor, past, params: SamplingParams, seed: int):
        """The fixed-size-cache loop (`StaticDecoder`, compiled or not); same return as `_decode_generate`."""
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        d = self.decoder.run(ids, mask, params.max_new_tokens, self.stop_ids, self.tokenizer.pad_token_id,
                             greedy=params.greedy, temperature=params.temperature, top_p=params.top_p,
                             generator=generator, past=past)
        return d.tokens, d.lengths, d.layers, d.cached_len

    def _batch_prefix(self, seqs: list[list[int]]):
        """(per-layer keys/values, per-row lengths) of what this batch need not prefill row by row, or (None, _).

        A row's prefix comes from the prefix cache (the previous step's keys/values for the text this
        request extends) or from its group in this batch: rows that open the same way (the same
        worked example in front of their critique requests) have that opening read once, in one
        extra forward pass over the group prefixes. Each row takes the longer of the two. The result
        holds each row's prefix right-aligned in the first columns, zeros (masked) before it.
        """
        cache = self.prefix_cache
        hits = [cache.lookup(s) for s in seqs]
        cache.stats.prompt_tokens += sum(len(s) for s in seqs)
        lens = [n for _, n in hits]
        sources: list = [cache.get(eid).kv if eid is not None else None for eid, _ in hits]
        groups = []
        for n, members in shared_prefix_groups(seqs, len(seqs), min_shared=SHARE_MIN_TOKENS):
            gaining = [r for r in members if n > lens[r]]
            if len(gaining) > 1:  # read once for two or more rows, else no saving
                groups.append((n, gaining))
        if groups:
            for (n, members), kv in zip(groups, self._prefill([seqs[m[0]][:n] for n, m in groups])):
                for r in members:
                    lens[r], sources[r] = n, kv
                cache.stats.shared_tokens += (len(members) - 1) * n
        from_cache = [eid is not None and kv is cache.get(eid).kv for (eid, _), kv in zip(hits, sources)]
        taken = {eid for (eid, _), used in zip(hits, from_cache) if used}
        reused = sum(n for (_, n), used in zip(hits, from_cache) if used)
        cache.stats.reused_tokens += reused
        self.stats.cached_prompt_tokens += reused
        for eid in taken:
            cache.release(eid)  # taken: this batch's continuation will be cached in its place
        if max(lens) == 0:
            return None, lens
        return self._aligned_layers(sources, lens), lens

    def _split_layout(self, seqs: list[list[int]], lens: list[int]):
        """Input ids and mask for rows whose first lens[r] tokens are cached: the cached prefixes
        right-aligned in the first max(lens) columns, then the tails left-padded. The padding between
        the two parts is masked, and positions follow the mask, so each row sees only its own text.
        Also returns each row's prompt columns, for `_remember`."""
        p_ids, p_mask = self._pad_left([s[:n] for s, n in zip(seqs, lens)])
        t_ids, t_mask = self._pad_left([s[n:] for s, n in zip(seqs, lens)])
        wp, width = p_ids.shape[1], p_ids.shape[1] + t_ids.shape[1]
        cols = [list(range(wp - n, wp)) + list(range(width - (len(s) - n), width)) for s, n in zip(seqs, lens)]
        return torch.cat([p_ids, t_ids], dim=1), torch.cat([p_mask, t_mask], dim=1), cols

    def _remember(self, seqs: list[list[int]], cols: list[list[int]], gen: torch.Tensor, lengths: list[int],
                  layers: list[tuple[torch.Tensor, torch.Tensor]], cached_len: int) -> None:
        """Keep each row's prompt + reply (through its stop token) K/V for the next call to extend.
        `cols` are each row's prompt columns; generated tokens follow every prompt's last column; only
        the first `cached_len` columns of `layers` hold K/V (the last generated token has none yet)."""
        for row, (s, c, n) in enumerate(zip(seqs, cols, lengths)):
            where = [i for i in c + list(range(c[-1] + 1, c[-1] + 1 + n)) if i < cached_len]
            if len(where) < BLOCK:
                continue
            index = torch.tensor(where, device=layers[0][0].device)
            kv = [(k[row].index_select(1, index), v[row].index_select(1, index)) for k, v in layers]
            self.prefix_cache.insert((s + gen[row, :n].tolist())[: len(where)], kv)

    @torch.inference_mode()
    def option_logprobs(self, conversations: Sequence[Conversation], prefix: str, options: Sequence[str], desc: str = "judge") -> list[list[float]]:
        """log P(option | conversation + assistant prefix) for single-token options.

        Questions asked in both orders share their opening (the judge's pair up to the first reply, the
        grader's question up to its options), so questions are grouped by shared prefix: each group's
        prefix is read once and only the differing tails are read per question (`shared_prefix_groups`).
        """
        option_ids = []
        for o in options:
            ids = self.tokenizer(o, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"option {o!r} is {len(ids)} tokens; options must be single tokens")
            option_ids.append(ids[0])
        encoded = [self.tokenizer(self.render(c) + prefix, add_special_tokens=False)["input_ids"] for c in conversations]
        out: list[list[float]] = [[] for _ in encoded]
        start = time.perf_counter()
        bar = tqdm(total=len(encoded), desc=desc, unit="seq", disable=not self.show_progress, leave=False, mininterval=_BAR_INTERVAL)
        groups = shared_prefix_groups(encoded, self.batch_size)
        for batch in self._group_batches(groups, encoded):
            logits = self._forward_shared(encoded, batch)
            lp = torch.log_softmax(logits, dim=-1)[:, option_ids]
            rows = [i for _, members in batch for i in members]
            for row, i in enumerate(rows):
                out[i] = lp[row].tolist()
            self.stats.prompt_tokens += sum(len(encoded[i]) for i in rows)
            bar.update(len(rows))
        bar.close()
        self._account(desc, start)
        return out

    def _group_batches(self, groups: list[tuple[int, list[int]]], encoded: list[list[int]]) -> list[list[tuple[int, list[int]]]]:
        """Groups in length order (longest first), packed into batches of at most batch_size questions."""
        batches: list[list[tuple[int, list[int]]]] = []
        size = self.batch_size
        for group in sorted(groups, key=lambda g: -max(len(encoded[i]) for i in g[1])):
            if size + len(group[1]) > self.batch_size:
                batches.append([])
                size = 0
            batches[-1].append(group)
            size += len(group[1])
        return batches

    def _forward_shared(self, encoded: list[list[int]], batch: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Last-position logits of every member of `batch`, reading each group's shared prefix once:
        the prefixes in one pass (`_prefill`), then every member's tail on top of its group's K/V."""
        seqs = [encoded[i] for _, members in batch for i in members]
        lens = [n for n, members in batch for _ in members]
        if not any(lens):  # nothing shared in this batch: one plain pass
            ids, mask = self._pad_left(seqs)
            return self._forward(ids, mask, logits_to_keep=1)[:, -1]
        kvs = iter(self._prefill([encoded[members[0]][:n] for n, members in batch if n]))
        sources = []
        for n, members in batch:
            sources += [next(kvs) if n else None] * len(members)
        from transformers import DynamicCache

        ids, mask, _ = self._split_layout(seqs, lens)
        wp = max(lens)
        out = self.model(input_ids=ids[:, wp:], attention_mask=mask, position_ids=positions_from_mask(mask)[:, wp:],
                         past_key_values=DynamicCache(self._aligned_layers(sources, lens), config=self.model.config), logits_to_keep=1)
        return out.logits[:, -1].float()

    def _prefill(self, prefixes: list[list[int]]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per prefix, per layer (keys, values) shaped [kv_heads, len, head_dim], from one left-padded pass."""
        ids, mask = self._pad_left(prefixes)
        past = self.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                          use_cache=True, logits_to_keep=1).past_key_values
        width = ids.shape[1]
        return [[(layer.keys[g, :, width - len(p) :], layer.values[g, :, width - len(p) :]) for layer in past.layers]
                for g, p in enumerate(prefixes)]

    def _aligned_layers(self, sources: list, lens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of max(lens) columns holding row r's first lens[r] keys/values from
        sources[r], right-aligned; zeros before them (masked by `_split_layout`'s mask)."""
        wp = max(lens)
        template = next(kv for kv in sources if kv is not None)
        layers = []
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros((len(lens), k0.shape[0], wp, k0.shape[-1]))
            values = v0.new_zeros((len(lens), v0.shape[0], wp, v0.shape[-1]))
            for row, (kv, n) in enumerate(zip(sources, lens)):
                if n:
                    keys[row, :, wp - n :] = kv[layer][0][:, :n]
                    values[row, :, wp - n :] = kv[layer][1][:, :n]
            layers.append((keys, values))
        return layers

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], continuations: Sequence[str], desc: str = "score") -> list[float]:
        """log P(continuation | prompt), summed over the continuation's tokens, in one forward pass per batch."""
        if len(prompts) != len(continuations):
            raise ValueError("score: prompts and continuations differ in length")
        pairs = []
        for p, c in zip(prompts, continuations):
            p_ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            c_ids = self.tokenizer(c, add_special_tokens=False)["input_ids"]
            if not c_ids:
                raise ValueError(f"score: continuation {c!r} encodes to no tokens")
            pairs.append((p_ids, c_ids))
        scores = [0.0] * len(pairs)
        start = time.perf_counter()
        bar = tqdm(total=len(pairs), desc=desc, unit="seq", disable=not self.show_progress, leave=False, mininterval=_BAR_INTERVAL)
        for idx in self._batches([len(p) + len(c) for p, c in pairs]):
            seqs = [pairs[i][0] + pairs[i][1] for i in idx]
            ids, mask = self._pad_left(seqs)
            logits = self._forward(ids, mask)
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:]
            token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            width = ids.shape[1]
            for row, i in enumerate(idx):
                n_cont = len(pairs[i][1])
                # continuation tokens occupy the last n_cont positions; their predictions sit one step earlier
                scores[i] = float(token_lp[row, width - 1 - n_cont : width - 1].sum())
            bar.update(len(idx))
        bar.close()
        self._account(desc, start)
        return scores

    def _account(self, desc: str, start: float) -> float:
        return self.stats.add_time(desc, start)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), **kwargs).logits.float()
