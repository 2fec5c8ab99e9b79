"""Shards of a multi-node stage: `shards: S` with `nodes: M` is one Indexed Job of S x M pods, a group of M
pods per shard. One pod template serves them all, so each pod fills its group in from JOB_COMPLETION_INDEX
(`fill_group`): its group meets at the group's first pod and runs that group's shard. The run on emulated
pods is in tests/test_engine_vllm.py (only vLLM spans pods)."""

from __future__ import annotations

from jobs.distributed import GROUP, LEADER, fill_group
from test_distributed_train import rendered_generate

LAUNCH = ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", f"--rdzv-endpoint=job-{LEADER}.job:29500",
          f"--rdzv-id=job-{GROUP}", "-m", "jobs.cli", "stage", "generate", "--spec", "s3://b/spec.json", "--shard", GROUP]


def test_each_pod_fills_in_its_group_its_leader_and_its_shard():
    filled = [fill_group(LAUNCH, i) for i in range(6)]
    assert [a[3] for a in filled] == ["--rdzv-endpoint=job-0.job:29500"] * 2 + ["--rdzv-endpoint=job-2.job:29500"] * 2 + [
        "--rdzv-endpoint=job-4.job:29500"] * 2
    assert [(a[4], a[-1]) for a in filled] == [("--rdzv-id=job-0", "0")] * 2 + [("--rdzv-id=job-1", "1")] * 2 + [
        ("--rdzv-id=job-2", "2")] * 2
    plain = ["--nnodes=2", "--rdzv-endpoint=job-0.job:29500", "--rdzv-id=job"]
    assert fill_group(plain, 3) == plain  # one group: nothing to fill in
    odd = [*LAUNCH[:-3], "s3://b/{group}/spec.json", "--shard", GROUP]
    assert fill_group(odd, 2)[-3:] == ["s3://b/{group}/spec.json", "--shard", "1"]  # a URI is never rewritten


def test_cai_torchrun_fills_the_group_in_before_torchrun_reads_it(monkeypatch):
    import torch.distributed.run as torchrun

    from jobs.launch import main

    seen = {}
    monkeypatch.setattr(torchrun, "run", lambda args: seen.update(vars(args)))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert main(LAUNCH) == 0
    assert (seen["rdzv_endpoint"], seen["rdzv_id"], seen["nnodes"]) == ("job-2.job:29500", "job-1", "2")
    assert seen["training_script_args"][-2:] == ["--shard", "1"]
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert main(LAUNCH) == 2  # without its index a pod would run another group's shard: one line, exit 2


def test_shards_of_a_multi_node_stage_render_one_job_of_groups():
    """generate with shards: 3 over 2 pods of 8 GPUs each: 6 pods in one strict-valid Indexed Job, one
    rendezvous Service, one failed pod fails them all; the command carries the group placeholders."""
    job, services = rendered_generate({"generate": {"shards": 3},
                                       "kubernetes": {"stages": {"generate": {"gpus": 8, "nodes": 2, "memory": "1000Gi"}}}})
    name = job["metadata"]["name"]
    assert services == [name]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 6, 6)
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["operator"] == "NotIn"
    command = spec["template"]["spec"]["containers"][0]["command"]
    assert command[:6] == ["cai-torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint={name}-{LEADER}.{name}:29500", f"--rdzv-id={name}-{GROUP}"]
    assert command[-2:] == ["--shard", GROUP]
    assert fill_group(command[1:], 5)[3] == f"--rdzv-endpoint={name}-4.{name}:29500"


def test_more_pods_than_an_indexed_job_may_have_are_refused():
    import re

    import pytest

    from jobs.config import RunConfig

    with pytest.raises(ValueError, match=re.escape("generate.shards: 1000: 128000 pods, over the 100000 completions")):
        RunConfig.model_validate({"engine": {"backend": "vllm"}, "generate": {"shards": 1000},
                                  "kubernetes": {"stages": {"generate": {"gpus": 8, "nodes": 128}}}})
