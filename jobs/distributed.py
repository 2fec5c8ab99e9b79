"""Where this process sits in a distributed stage: torchrun's RANK / WORLD_SIZE, and the launcher command.

A train stage with more than one process runs under `torchrun` (one process per GPU, or per CPU slot
for the gloo tests); trl's trainers pick the process group up from the environment. Only rank 0
writes to the store: the saved model, the metrics and the stage manifest.

`ddp` keeps a whole model on every process. The sharded strategies (`fsdp`, `deepspeed`) split the weights,
gradients and optimizer state over all processes; they become the trainers' own arguments here
(`strategy_args`), so trl and accelerate do the sharding and the gathering of the saved model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def train_processes(stage: str, params: dict) -> int:
    """Processes per node a stage's spec asks for: `train.distributed.processes`, 1 for every other stage."""
    return int((params.get("distributed") or {}).get("processes", 1)) if stage == "train" else 1


def train_strategy(stage: str, params: dict) -> str:
    """`train.distributed.strategy` of a train spec; `ddp` (nothing sharded) for every other stage."""
    return str((params.get("distributed") or {}).get("strategy", "ddp")) if stage == "train" else "ddp"


def launch_layout(stage: str, params: dict, gpus: int, nodes: int) -> int:
    """Processes per pod of one stage's launch (torchrun when more than one, or more than one pod).

    train: `train.distributed.processes`. The engine stages on one pod: one process, whose vLLM spawns
    its own tensor-parallel workers over the pod's GPUs. On several pods: one process per GPU (one per
    CPU pod), and vLLM splits the model over all of them (`engine_parallel`)."""
    if stage == "train":
        return train_processes(stage, params)
    return max(gpus, 1) if nodes > 1 else 1


def engine_parallel() -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes of an engine stage under torchrun: the processes of one pod split
    each layer (fast links inside a node), the pods split the layers between them (one hop per step across
    nodes). (1, 1) outside torchrun."""
    from .errors import ConfigError

    world = world_size()
    if world <= 1:
        return 1, 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if local <= 0 or world % local:
        raise ConfigError(f"engine: WORLD_SIZE={world} with LOCAL_WORLD_SIZE={local or 'unset'}: an engine stage over several pods "
                          "needs the same number of processes in every pod; launch it with cai-torchrun --nproc-per-node")
    return local, world // local


def launcher(processes: int, nodes: int = 1, rendezvous: str | None = None, rendezvous_id: str = "cai") -> list[str]:
    """The torchrun arguments before `-m jobs.cli ...`: standalone on one node; on several, c10d
    rendezvous at `rendezvous` (host:port of node 0's pod), which assigns every process its rank."""
    if nodes <= 1:
        return ["--standalone", f"--nproc-per-node={processes}"]
    return [f"--nnodes={nodes}", f"--nproc-per-node={processes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous}",
            f"--rdzv-id={rendezvous_id}"]


GROUP, LEADER = "{group}", "{leader}"  # filled in each pod by `fill_group`


def fill_group(args: list[str], index: int) -> list[str]:
    """A pod's launch arguments with its group filled in. Shards of a multi-node stage are groups of
    `--nnodes` pods in one Indexed Job: pod `index` is in group `index // nnodes`, whose first pod (the
    leader, index `group * nnodes`) hosts the group's rendezvous; the group number is also its shard. One
    pod template serves every pod, so the pod fills these in from its JOB_COMPLETION_INDEX."""
    if not grouped(args):
        return list(args)
    nodes = launch_nodes(args)
    group = index // nodes
    return [a.replace(GROUP, str(group)).replace(LEADER, str(group * nodes)) if _fillable(args, i) else a
            for i, a in enumerate(args)]


def launch_nodes(args: list[str]) -> int:
    """The pods a torchrun launch spans (its `--nnodes=`; 1 without it)."""
    return next((int(a.split("=", 1)[1]) for a in args if a.startswith("--nnodes=")), 1)


def grouped(args: list[str]) -> bool:
    """Whether a launch's arguments name a group (a sharded stage over several pods)."""
    return any(_fillable(args, i) and (GROUP in a or LEADER in a) for i, a in enumerate(args))


def _fillable(args: list[str], i: int) -> bool:
    """Only the rendezvous arguments and the `--shard` value hold placeholders (never a spec's URI)."""
    return args[i].startswith("--rdzv-") or (i > 0 and args[i - 1] == "--shard")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Wait for every process of the stage (no-op when there is one, or before the trainers start the group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sharded(section: Any) -> bool:
    """Whether the strategy splits the model itself over the processes (the saved model is then gathered)."""
    return section.strategy in ("fsdp", "deepspeed")


def deepspeed_config(options: Any) -> dict[str, Any]:
    """A DeepSpeed config in transformers' shape: `"auto"` where the trainer fills the value in (batch sizes,
    accumulation, clipping, bf16 from the train settings), ZeRO from `train.distributed.deepspeed`."""
    if options.config is not None:  # as given, except that a ZeRO-3 model must be gathered to be saved as a model
        config = {**options.config}
        zero = dict(config.get("zero_optimization") or {})
        if zero.get("stage") == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
            config["zero_optimization"] = zero
        return config
    zero: dict[str, Any] = {"stage": options.stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if options.stage == 3:  # the saved model is gathered into one fp16/bf16 state dict on rank 0
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if options.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"bf16": {"enabled": "auto"}, "zero_optimization": zero, "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}


def strategy_args(section: Any) -> dict[str, Any]:
    """The trainers' arguments for `train.distributed.strategy` (TrainingArguments keys); {} for ddp."""
    if section.strategy == "fsdp":
        o = section.fsdp
        fsdp_config: dict[str, Any] = {
            "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": o.reshard_after_forward,
            "activation_checkpointing": o.activation_checkpointing, "cpu_offload": o.cpu_offload,
            "state_dict_type": "FULL_STATE_DICT",  # save_model gathers the whole model on rank 0
            "cpu_ram_efficient_loading": o.cpu_ram_efficient_loading,
        }
        if o.wrap:
            fsdp_config["transformer_layer_cls_to_wrap"] = list(o.wrap)
        args: dict[str, Any] = {"fsdp": True, "fsdp_config": fsdp_config}
        if o.activation_checkpointing:  # FSDP's own replaces transformers' (which would all-gather the weights twice)
            args["gradient_checkpointing"] = False
        return args
    if section.strategy == "deepspeed":
        return {"deepspeed": deepspeed_config(section.deepspeed)}
    return {}


def memory_layout(section: Any) -> tuple[bool, bool]:
    """(full_shard, offload) of `train.distributed` for the memory estimate: whether the weights stay sharded
    between forward passes (FSDP reshard_after_forward, ZeRO-3), and whether state lives in host memory.
    A whole user DeepSpeed config wins over the `deepspeed.*` keys, as it does in `deepspeed_config`."""
    if section.strategy == "fsdp":
        return section.fsdp.reshard_after_forward, section.fsdp.cpu_offload
    if section.strategy == "deepspeed":
        o = section.deepspeed
        if o.config is not None:
            zero = o.config.get("zero_optimization") or {}
            return zero.get("stage", o.stage) == 3, bool(zero.get("offload_optimizer") or zero.get("offload_param"))
        return o.stage == 3, o.offload_optimizer or o.offload_params
    return False, False


@contextlib.contextmanager
def node_scratch(prefix: str, shared: bool) -> Iterator[Path]:
    """A scratch directory every process on this node shares (`shared`), else this process's own.

    Under a sharded strategy the gathered SFT model is written once per node and read back by every
    process for DPO, so the path is the same for all of a launch's processes: torchrun's run id names it.
    The node's first process removes it when it is done: by then the others have read what they need (the
    last gather ends with a barrier), and none waits for rank 0's upload, which may outlast any timeout.
    """
    if not shared or world_size() == 1:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)
        return
    path = Path(tempfile.gettempdir()) / f"{prefix}{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if local_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)


CHUNK = 256 << 20  # bytes per broadcast: a model file travels in pieces, never whole in memory


def share_with_every_node(path: Path) -> None:
    """Every process calls it after rank 0 has written `path`: the first process of every other node receives
    the same files into its own `path` (its node's scratch), over a gloo group of the nodes' first processes.

    Under FSDP the gathered state dict exists on global rank 0 only, so without this the other nodes would
    start DPO from a directory without weights. A no-op on one node. torchrun numbers ranks node by node,
    so each node's first process is a multiple of the processes per node.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))
    if per_node >= world_size():
        return
    heads = list(range(0, world_size(), per_node))
    group = dist.new_group(ranks=heads, backend="gloo")  # collective: every process creates it, in the same order
    if rank() in heads:
        listing = [sorted((str(f.relative_to(path)), f.stat().st_size) for f in path.rglob("*") if f.is_file())] if rank() == 0 else [None]
        dist.broadcast_object_list(listing, src=0, group=group)
        for rel, size in listing[0]:
            target = path / rel
            if rank() != 0:
                target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "rb" if rank() == 0 else "wb") as f:
                for start in range(0, max(size, 1), CHUNK):
                    n = min(CHUNK, size - start)
                    if n <= 0:
                        break
                    buf = torch.frombuffer(bytearray(f.read(n)), dtype=torch.uint8) if rank() == 0 else torch.empty(n, dtype=torch.uint8)
                    dist.broadcast(buf, src=0, group=group)
                    if rank() != 0:
                        f.write(buf.numpy().tobytes())
    barrier()
