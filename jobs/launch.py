"""`cai-torchrun`: torchrun, exiting with the first failed worker's own exit code.

torchrun exits 1 whatever its workers exit with. A stage's bad input exits 2, and the Job's pod
failure policy fails at once on 2 (a retry cannot fix a config); through plain torchrun the Job would
retry it `backoffLimit` times on every GPU of the pod. A worker killed by a signal exits 128 + the signal,
as a shell reports it.

The pods of a sharded multi-node stage are groups of `--nnodes`; each pod fills its group into the
arguments first (`jobs.distributed.fill_group`).
"""

from __future__ import annotations

import os
import sys


def exit_code(worker_exit: int) -> int:
    """A worker's exit code as this process's: as is, or 128 + N for a worker killed by signal N (-N)."""
    if worker_exit < 0:
        return 128 + (-worker_exit)
    return worker_exit if 0 < worker_exit < 256 else 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .distributed import fill_group, grouped
    from .sharding import INDEX_ENV

    argv = sys.argv[1:] if argv is None else argv
    if grouped(argv):
        index = os.environ.get(INDEX_ENV, "")
        if not index.isdigit():
            print(f"error: {INDEX_ENV}: {index or 'not set'}; a sharded stage over several pods runs in an Indexed Job, "
                  f"which sets it in every pod (run the Job, not its pod template)", file=sys.stderr, flush=True)
            return 2
        argv = fill_group(argv, int(index))
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"[cai-torchrun] worker rank {rank} exited {failure.exitcode} first; the launch fails with it",
              file=sys.stderr, flush=True)
        return exit_code(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
