"""Where this process sits in a distributed stage: torchrun's RANK / WORLD_SIZE, and the launcher command.

A train stage with more than one process runs under `torchrun` (one process per GPU, or per CPU slot
for the gloo tests); trl's trainers pick the process group up from the environment. Only rank 0
writes to the store: the saved model, the metrics and the stage manifest.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def train_processes(stage: str, params: dict) -> int:
    """Processes per node a stage's spec asks for: `train.distributed.processes`, 1 for every other stage."""
    return int((params.get("distributed") or {}).get("processes", 1)) if stage == "train" else 1


def launcher(processes: int, nodes: int = 1, rendezvous: str | None = None, rendezvous_id: str = "cai") -> list[str]:
    """The torchrun arguments before `-m jobs.cli ...`: standalone on one node; on several, c10d
    rendezvous at `rendezvous` (host:port of node 0's pod), which assigns every process its rank."""
    if nodes <= 1:
        return ["--standalone", f"--nproc-per-node={processes}"]
    return [f"--nnodes={nodes}", f"--nproc-per-node={processes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous}",
            f"--rdzv-id={rendezvous_id}"]
