"""The vLLM engine, for real, on the bundled SmolLM2-135M-Instruct: same answers as the transformers engine.

Runs in the vLLM environment only (`make test-vllm`: `pytest -m vllm` in .venv-vllm); elsewhere the
module is skipped. fp32 is used wherever outputs are compared with the transformers engine: there
both engines are exact enough that greedy decoding agrees token for token.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Before vLLM is imported: skip the 40-70 s torch.compile at engine start (tests care about answers,
# not speed; compiled and eager fp32 give the same greedy text).
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; run `make test-vllm`")

from jobs.config import EngineConfig  # noqa: E402
from jobs.engines import choose_backend  # noqa: E402
from jobs.engines.base import SamplingParams  # noqa: E402
from jobs.engines.hf import HFEngine  # noqa: E402
from jobs.engines.vllm import VLLMEngine  # noqa: E402
from jobs.judging import ANSWER_PREFIX, LABELS, comparison_messages, two_way  # noqa: E402
from jobs.stages import run_stage  # noqa: E402

from kube_emulator import cluster_factory  # noqa: E402,F401 - a fixture
from test_generate_stage import plan_generate  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.bundled]

REPO = Path(__file__).resolve().parent.parent

CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a primary color."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Write a haiku about rain on a tin roof at night."}],
    [{"role": "user", "content": "How do I kill a stuck Python process?"}],
    [{"role": "user", "content": "Give me three tips for a job interview."}],
]


@pytest.fixture(scope="module")
def vllm_fp32(bundled_model_dir):
    return VLLMEngine(str(bundled_model_dir), dtype="auto", show_progress=False)  # auto = float32 on CPU


@pytest.fixture(scope="module")
def hf_fp32(bundled_model_dir):
    return HFEngine(str(bundled_model_dir), dtype="float32", device="cpu", batch_size=8, show_progress=False)


def test_renders_and_stops_like_the_transformers_engine(vllm_fp32, hf_fp32):
    for conv in CONVS:
        assert vllm_fp32.render(conv) == hf_fp32.render(conv)
        assert vllm_fp32.render(conv, add_generation_prompt=False) == hf_fp32.render(conv, add_generation_prompt=False)
    assert vllm_fp32.stop_ids == hf_fp32.stop_ids


def test_greedy_fp32_equals_the_transformers_engine(vllm_fp32, hf_fp32):
    assert vllm_fp32.dtype == "float32"  # what `auto` means on CPU
    params = SamplingParams(max_new_tokens=48)
    ours = vllm_fp32.generate(CONVS, params)
    theirs = hf_fp32.generate(CONVS, params)
    assert ours == theirs
    assert "Paris" in ours[0]


def test_stops_at_end_of_turn_and_respects_the_token_cap(vllm_fp32):
    tok = vllm_fp32.tokenizer
    before = vllm_fp32.stats.generated_tokens
    reply = vllm_fp32.generate([CONVS[0]], SamplingParams(max_new_tokens=64))[0]
    used = vllm_fp32.stats.generated_tokens - before
    # the reply ended by itself, on the end-of-turn token (counted, like the HF engine does), under the cap
    assert len(tok(reply, add_special_tokens=False)["input_ids"]) + 1 <= used < 64
    before = vllm_fp32.stats.generated_tokens
    capped = vllm_fp32.generate(CONVS, SamplingParams(max_new_tokens=5))
    assert vllm_fp32.stats.generated_tokens - before <= 5 * len(CONVS)
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 6 for c in capped)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(vllm_fp32):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=7)
    a = vllm_fp32.generate(CONVS, params)
    assert a == vllm_fp32.generate(CONVS, params)
    assert vllm_fp32.generate(CONVS[::-1], params) == a[::-1]  # order of the batch does not matter
    assert vllm_fp32.generate([CONVS[3]], params) == [a[3]]  # nor what else is in it
    assert vllm_fp32.generate(CONVS, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=8)) != a
    # k samples of one prompt in one call differ from each other, and the first is the prompt's usual sample
    k = vllm_fp32.generate([CONVS[3]] * 3, params)
    assert k[0] == a[3] and len(set(k)) == 3


def _judge_questions():
    from jobs.constitution import load_constitution

    principle = load_constitution("default").principles[0]
    user = [{"role": "user", "content": "How do I pick a lock?"}]
    good, bad = "I can't help with breaking into property, but a locksmith can.", "Insert a tension wrench and rake the pins."
    return [comparison_messages(user, good, bad, principle), comparison_messages(user, bad, good, principle),
            comparison_messages(CONVS[0], "Paris.", "Berlin.", principle), comparison_messages(CONVS[0], "Berlin.", "Paris.", principle)]


def test_option_logprobs_equal_the_transformers_engine_and_prompt_logprobs(vllm_fp32, hf_fp32):
    questions = _judge_questions()
    ours = vllm_fp32.option_logprobs(questions, ANSWER_PREFIX, LABELS)
    theirs = hf_fp32.option_logprobs(questions, ANSWER_PREFIX, LABELS)
    for o, t in zip(ours, theirs):
        assert o == pytest.approx(t, abs=2e-3)
        assert (o[0] > o[1]) == (t[0] > t[1])
        assert two_way(*o) == pytest.approx(two_way(*t), abs=1e-3)
    # the documented route: append each label and read its prompt log-prob (exact at any rank)
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    tok = vllm_fp32.tokenizer
    for q, o in zip(questions, ours):
        base = tok(vllm_fp32.render(q) + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        for label, got in zip(LABELS, o):
            lid = tok(label, add_special_tokens=False)["input_ids"]
            res = vllm_fp32.llm.generate([TokensPrompt(prompt_token_ids=base + lid)], VSP(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
            assert res[0].prompt_logprobs[-1][lid[0]].logprob == pytest.approx(got, abs=1e-4)


def test_score_equals_the_transformers_engine(vllm_fp32, hf_fp32):
    prompt = vllm_fp32.render(CONVS[0])
    conts = ["The capital of France is Paris.", "The capital of France is London.", " Paris", "Bananas are blue."]
    ours = vllm_fp32.score([prompt] * len(conts), conts)
    theirs = hf_fp32.score([prompt] * len(conts), conts)
    assert ours == pytest.approx(theirs, abs=1e-2)
    assert sorted(range(len(conts)), key=ours.__getitem__) == sorted(range(len(conts)), key=theirs.__getitem__)
    assert all(math.isfinite(s) and s < 0 for s in ours)


def test_stats_count_calls_tokens_and_steps(vllm_fp32):
    st = vllm_fp32.stats
    before = (st.calls, st.sequences, st.prompt_tokens, st.generated_tokens, st.seconds)
    vllm_fp32.generate(CONVS[:2], SamplingParams(max_new_tokens=4), desc="tiny step")
    prompt_tokens = sum(len(vllm_fp32.tokenizer(vllm_fp32.render(c), add_special_tokens=False)["input_ids"]) for c in CONVS[:2])
    assert (st.calls - before[0], st.sequences - before[1], st.prompt_tokens - before[2]) == (1, 2, prompt_tokens)
    assert 2 <= st.generated_tokens - before[3] <= 8
    assert st.seconds > before[4] and st.per_step["tiny step"] > 0


def test_prefix_cache_reuses_short_conversations_a_request_extends(vllm_fp32):
    """A critique request extends a conversation of ~100 tokens; vLLM's CPU default block (128 tokens)
    would cache none of it, so the engine asks for 32-token blocks."""
    from jobs.engines.vllm import CPU_BLOCK_SIZE

    st = vllm_fp32.stats
    conv = [{"role": "user", "content": "Write a haiku about a lighthouse keeper who finds a letter in a bottle."}]
    reply = vllm_fp32.generate([conv], SamplingParams(max_new_tokens=40))[0]
    extended = conv + [{"role": "assistant", "content": reply},
                       {"role": "user", "content": "Point out anything harmful in your last answer."}]
    n_conv = len(vllm_fp32._encode(vllm_fp32.render(conv + [{"role": "assistant", "content": reply}], add_generation_prompt=False)))
    assert CPU_BLOCK_SIZE < n_conv < 128
    before = st.cached_prompt_tokens
    vllm_fp32.generate([extended], SamplingParams(max_new_tokens=4))
    assert st.cached_prompt_tokens - before >= CPU_BLOCK_SIZE
    # both orders of a judged pair, in one call: the second reads the shared opening from the first
    from jobs.constitution import load_constitution

    principle = load_constitution("default").principles[1]
    user = [{"role": "user", "content": "My neighbour's dog barks all night. How can I get it to stop?"}]
    a, b = "Talk to your neighbour first, then contact local animal control.", "Poison it."
    questions = [comparison_messages(user, a, b, principle), comparison_messages(user, b, a, principle)]
    before = st.cached_prompt_tokens
    vllm_fp32.option_logprobs(questions, ANSWER_PREFIX, LABELS)
    assert st.cached_prompt_tokens - before >= CPU_BLOCK_SIZE


def test_auto_picks_vllm_only_for_models_it_supports(bundled_model_dir, tiny_model_dir, tmp_path):
    auto = EngineConfig(backend="auto")
    assert choose_backend(auto, str(bundled_model_dir))[0] == "vllm"
    backend, why = choose_backend(auto, str(tiny_model_dir))  # head size 16: no CPU attention kernel
    assert backend == "hf" and "head size 16" in why
    fake = tmp_path / "fake"
    fake.mkdir()
    config = json.loads((bundled_model_dir / "config.json").read_text())
    (fake / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    backend, why = choose_backend(auto, str(fake))
    assert backend == "hf" and "NoSuchModelForCausalLM" in why
    assert choose_backend(EngineConfig(backend="auto", device="cuda"), str(bundled_model_dir))[0] == "hf"


def same_as_transformers(out: Path, config: Path, store_dir: Path, hf_engine) -> Path:
    """The same generate spec run in process by the transformers engine (same dtype) wrote the same bytes as `out`."""
    store_hf, spec_hf = plan_generate(config, store_dir, engine__backend="hf")
    assert run_stage("generate", store_hf.uri_for(spec_hf.spec_key), engine=hf_engine) is True
    hf_out = Path(store_hf.root) / spec_hf.output
    for name in ("sft.jsonl", "traces.jsonl"):
        assert (out / name).read_text() == (hf_out / name).read_text(), name
    return hf_out


def test_generate_stage_with_vllm_writes_what_the_transformers_engine_writes(tmp_path, bundled_model_dir, hf_fp32):
    config = tmp_path / "run.yaml"
    config.write_text(f"""name: vllm-vs-hf
model: {bundled_model_dir}
constitution: default
data:
  train:
    - source: bundled:red-team
      limit: 3
    - source: bundled:helpful
      limit: 2
engine:
  backend: vllm
  dtype: float32
generate:
  revision_rounds: 1
  few_shot: 1
  max_new_tokens: 40
  critique_max_new_tokens: 32
""")
    # vLLM: the pod's command, as a subprocess with piped (non-TTY) stderr
    store, spec = plan_generate(config, tmp_path / "vllm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "stage", "generate", "--spec", store.uri_for(spec.spec_key)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[engine] vllm" in proc.stderr and "float32 on cpu" in proc.stderr
    for step in ("respond", "round 1/1 critique", "round 1/1 revise"):
        assert sum(line.startswith(f"[engine] {step}:") for line in proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    vllm_out = Path(store.root) / spec.output
    hf_out = same_as_transformers(vllm_out, config, tmp_path / "hf", hf_fp32)
    ours, theirs = (json.loads((d / "stage.json").read_text()) for d in (vllm_out, hf_out))
    assert ours["counts"]["generated_tokens"] == theirs["counts"]["generated_tokens"] > 0
    assert ours["versions"].get("vllm-cpu") or ours["versions"].get("vllm")


def test_tensor_parallel_settings_are_vllms_own_engine_arguments(tiny_model_dir):
    """What the stage hands `vllm.LLM` (which passes it to `EngineArgs`) for an 8-GPU pod, next to what vLLM's
    own CLI parser makes of the same flags: the keys exist, and tensor parallelism reads the same."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from jobs.engines import tensor_parallel_size
    from jobs.engines.vllm import llm_kwargs

    model = str(tiny_model_dir)  # a real directory: EngineArgs resolves the model's config
    kwargs = llm_kwargs(model, "bfloat16", 0, False, None, "cuda", tensor_parallel_size("auto", visible=8))
    ours = EngineArgs(**kwargs)  # an unknown key would be a TypeError here, as in vllm.LLM
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    cli = EngineArgs.from_cli_args(parser.parse_args(["--model", model, "--dtype", "bfloat16", "--seed", "0",
                                                      "--tensor-parallel-size", "8", "--enable-prefix-caching",
                                                      "--skip-tokenizer-init"]))
    for field in ("tensor_parallel_size", "pipeline_parallel_size", "dtype", "enable_prefix_caching", "skip_tokenizer_init", "seed"):
        assert getattr(ours, field) == getattr(cli, field), field
    assert ours.tensor_parallel_size == 8
    assert "tensor_parallel_size" not in llm_kwargs("/m", "float32", 0, False, None, "cpu", 1)  # one device: vLLM's default


def test_pipeline_parallel_over_pods_is_vllms_own_external_launcher(tiny_model_dir):
    """A stage over 2 pods of 8 GPUs: what each torchrun process hands `vllm.LLM`, next to vLLM's own CLI parser
    for the same flags: tensor parallel 8 within a pod, pipeline parallel 2 across pods, torchrun's processes
    as vLLM's workers."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from jobs.engines.vllm import llm_kwargs

    model = str(tiny_model_dir)
    ours = EngineArgs(**llm_kwargs(model, "bfloat16", 0, False, None, "cuda", 8, 2, launched=True))
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    cli = EngineArgs.from_cli_args(parser.parse_args([
        "--model", model, "--dtype", "bfloat16", "--seed", "0", "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2",
        "--distributed-executor-backend", "external_launcher", "--enable-prefix-caching", "--skip-tokenizer-init"]))
    for field in ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "dtype", "seed"):
        assert getattr(ours, field) == getattr(cli, field), field
    assert (ours.tensor_parallel_size, ours.pipeline_parallel_size, ours.distributed_executor_backend) == (8, 2, "external_launcher")
    assert "distributed_executor_backend" not in llm_kwargs(model, "bfloat16", 0, False, None, "cuda", 8)  # one pod: vLLM's own workers


def test_generate_over_two_pods_pipeline_parallel_writes_what_one_process_writes(tmp_path, bundled_model_dir, hf_fp32, cluster_factory):
    """generate with nodes: 2 on the emulated cluster: an Indexed Job of 2 pods, each running torchrun; the pods
    meet at pod 0 and vLLM splits the model's layers between them (pipeline parallel, external launcher). The
    stage writes byte for byte what the transformers engine writes in one process (fp32, greedy), and only
    once: rank 0 writes, the other pod computes the same and drops it.

    Each emulated pod compiles the model (vllm-cpu 0.32's eager mode cannot run a later pipeline stage), so
    this takes a few minutes on 2 cores."""
    import kmock
    from kube_emulator import EXECUTE, JOBS
    from kube_emulator import executor as make_executor

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "pp", "model": str(bundled_model_dir), "engine": {"backend": "vllm", "dtype": "float32"},
        "data": {"train": [{"source": "bundled:red-team", "limit": 2}, {"source": "bundled:helpful", "limit": 1}]},
        "generate": {"revision_rounds": 1, "few_shot": 1, "max_new_tokens": 24, "critique_max_new_tokens": 16}}))
    store, spec = plan_generate(config, tmp_path / "pp")
    cluster = cluster_factory(lambda job, i, attempt: EXECUTE)
    make_executor(cluster, store, stages={"generate": {"gpus": 0, "nodes": 2, "cpu": "1", "memory": "8Gi"}}).run(
        "generate", store.uri_for(spec.spec_key))
    (job,) = cluster.objects(JOBS).values()
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["cai-torchrun", "--nnodes=2", "--nproc-per-node=1"]
    assert not cluster.objects(kmock.resource("", "v1", "services"))  # the rendezvous Service is gone afterwards
    logs = "\n".join(cluster.logs.values())
    assert logs.count("x2 (pipeline parallel)") == 2, logs[-3000:]  # both pods held half the layers
    assert logs.count("[generate] done in") == 1, logs[-3000:]  # one writer: rank 0
    pp_out = Path(store.root) / spec.output
    same_as_transformers(pp_out, config, tmp_path / "hf", hf_fp32)
    assert json.loads((pp_out / "stage.json").read_text())["counts"]["generated_tokens"] > 0


def _shm_isolation() -> tuple[bool, str]:
    from kube_emulator import shm_isolation

    return shm_isolation()


@pytest.mark.skipif(not _shm_isolation()[0], reason=f"each group of emulated pods needs a /dev/shm of its own (a mount "
                    f"namespace, which takes root): {_shm_isolation()[1]}")
def test_two_shards_over_two_pods_each_run_as_a_group_and_merge_to_one_process_outputs(tmp_path, bundled_model_dir, hf_fp32, cluster_factory):
    """generate with shards: 2 and nodes: 2: one Indexed Job of 4 pods. Pods 0-1 meet at pod 0 and run shard
    0, pods 2-3 meet at pod 2 and run shard 1, each group one model over its two pods (pipeline parallel),
    each group's rank 0 writing its shard. The merged outputs equal one process's (transformers, fp32)."""
    from kube_emulator import EXECUTE, JOBS
    from kube_emulator import executor as make_executor

    from jobs.stages import merge_stage

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "groups", "model": str(bundled_model_dir), "engine": {"backend": "vllm", "dtype": "float32"},
        "data": {"train": [{"source": "bundled:red-team", "limit": 1}, {"source": "bundled:helpful", "limit": 1}]},
        "generate": {"revision_rounds": 1, "few_shot": 1, "max_new_tokens": 16, "critique_max_new_tokens": 12}}))
    store, spec = plan_generate(config, tmp_path / "groups", generate__shards=2)
    cluster = cluster_factory(lambda job, i, attempt: EXECUTE)
    make_executor(cluster, store, stages={"generate": {"gpus": 0, "nodes": 2, "cpu": "1", "memory": "6Gi"}}).run(
        "generate", store.uri_for(spec.spec_key))
    (job,) = cluster.objects(JOBS).values()
    assert (job["spec"]["completions"], len(cluster.pods_started)) == (4, 4)
    logs = [log for _, log in sorted(cluster.logs.items())]
    assert [sum("x2 (pipeline parallel)" in log for log in logs)] == [4], logs[-1][-3000:]
    assert [sum(f"[generate] shard {s}/2" in log for log in logs) for s in (1, 2)] == [2, 2], logs[-1][-3000:]
    assert sum("[generate] done in" in log for log in logs) == 2  # one writer per group
    assert merge_stage("generate", store.uri_for(spec.spec_key)) is True
    same_as_transformers(Path(store.root) / spec.output, config, tmp_path / "hf", hf_fp32)


def test_judge_over_two_pods_pipeline_parallel_gives_one_process_verdicts(tmp_path, bundled_model_dir, vllm_fp32, cluster_factory):
    """The judge reads log-probs, which only the last pipeline stage computes: over 2 pods, rank 0 (the first
    stage, the one that writes) must still get them. Its preferences equal one process's, pair for pair."""
    from kube_emulator import EXECUTE
    from kube_emulator import executor as make_executor
    from test_judge_stage import make_spec

    from jobs.store import LocalStore

    runs = {}
    for name in ("pp", "one"):
        store = LocalStore(tmp_path / name)
        spec = make_spec(store, str(bundled_model_dir), helpful_pairs=False, min_margin=0.0)
        spec = spec.model_copy(update={"engine": EngineConfig(backend="vllm", dtype="float32")})
        store.write_json(spec.spec_key, spec.model_dump(mode="json"))
        runs[name] = (store, spec)
    store, spec = runs["pp"]
    make_executor(cluster_factory(lambda job, i, attempt: EXECUTE), store,
                  stages={"judge": {"gpus": 0, "nodes": 2, "cpu": "1", "memory": "8Gi"}}).run("judge", store.uri_for(spec.spec_key))
    one_store, one_spec = runs["one"]
    assert run_stage("judge", one_store.uri_for(one_spec.spec_key), engine=vllm_fp32) is True
    pp, one = ([json.loads(line) for line in (Path(s.root) / f"{sp.output}/prefs.jsonl").read_text().splitlines()]
               for s, sp in (runs["pp"], runs["one"]))
    assert len(pp) == len(one) == 2
    for a, b in zip(pp, one):
        assert (a["prompt"], a["chosen"], a["rejected"]) == (b["prompt"], b["chosen"], b["rejected"])
        assert a["p_chosen"] == pytest.approx(b["p_chosen"], abs=1e-3)

