"""What every benchmark shares: machine facts, other-load detection, tables, atomic JSON, bench prompts.

A benchmark's figures only mean something next to the machine they came from and the load it was
under, so each script records both (CPU, cores, versions, load average at start and end, the CPU time
other processes took while each side ran) and warns when another process disturbed it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
# Above this share of the machine taken by other processes, a side's figures are disturbed
# (a batch-1 loop with one torch thread per core suffers most: 6.8% other load once cost it 12%;
# quiet runs here measure 0-2%).
OTHER_LOAD_LIMIT = 0.05
BUSY_LIMIT = 0.2  # CPUs busier than this just before/after a run: someone else is computing


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine and load


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _proc_stat() -> list[int] | None:
    try:
        with open("/proc/stat") as fh:
            return [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all cores busy over a short sample, taken while the benchmark itself is idle (other load)."""
    def read() -> tuple[int, int] | None:
        vals = _proc_stat()
        if not vals or len(vals) < 4:
            return None
        return vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals[:8])  # idle + iowait, total

    first = read()
    time.sleep(seconds)
    second = read()
    if first is None or second is None or second[1] <= first[1]:
        return None
    return round(1 - (second[0] - first[0]) / (second[1] - first[1]), 3)


class OtherLoad:
    """CPU time other processes used while a block ran: all-CPU busy time minus this process's own.

    A share of the machine's capacity (cores x wall seconds). Child processes this one waited for
    count as *own* time (os.times includes reaped children), so a benchmark that runs stages as
    subprocesses is not mistaken for outside load.
    """

    def __init__(self, pids: Sequence[int] = ()):
        self.tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.pids = list(pids)  # helpers this benchmark started and does not reap (e.g. a store server): own time too
        self.share: float | None = None

    def _busy_s(self) -> float | None:
        vals = _proc_stat()
        if not vals or len(vals) < 4:
            return None
        return (sum(vals[:8]) - vals[3] - (vals[4] if len(vals) > 4 else 0)) / self.tck

    def _own_s(self) -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system + sum(self._pid_s(p) for p in self.pids)

    def _pid_s(self, pid: int) -> float:
        """utime + stime (+ its reaped children's) of another process, from /proc/<pid>/stat."""
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 0, utime field 11
            return sum(int(v) for v in fields[11:15]) / self.tck
        except (OSError, ValueError, IndexError):
            return 0.0

    def __enter__(self) -> "OtherLoad":
        self.t0, self.own0, self.busy0 = time.perf_counter(), self._own_s(), self._busy_s()
        return self

    def __exit__(self, *exc) -> None:
        busy1, own1 = self._busy_s(), self._own_s()
        wall = time.perf_counter() - self.t0
        if busy1 is None or self.busy0 is None or wall <= 0:
            return
        other = (busy1 - self.busy0) - (own1 - self.own0)
        self.share = round(max(other, 0.0) / (wall * (os.cpu_count() or 1)), 3)


def _load_avg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    """Facts recorded with every result; call before the benchmark starts working."""
    import torch
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1m_at_start": _load_avg(),
        "cpu_busy_before_run": cpu_busy_fraction(),
    }


def finish_machine(machine: dict[str, Any], shares: dict[str, float | None]) -> list[str]:
    """Record the end-of-run load and the other-load share of each side; return the warnings to print."""
    machine["load_avg_1m_at_end"] = _load_avg()
    machine["cpu_busy_after_run"] = cpu_busy_fraction()
    for side, share in shares.items():
        machine[f"other_cpu_share_during_{side}"] = share
    warnings = load_warnings(machine, shares)
    machine["disturbed"] = bool(warnings)
    return warnings


def load_warnings(machine: dict[str, Any], shares: dict[str, float | None]) -> list[str]:
    """Why these figures may not be comparable to a quiet machine (empty list: a quiet run)."""
    out = []
    for when in ("before", "after"):
        busy = machine.get(f"cpu_busy_{when}_run")
        if busy is not None and busy > BUSY_LIMIT:
            out.append(f"the CPUs were {busy:.0%} busy {when} the run (other processes)")
    for side, share in shares.items():
        if share is not None and share > OTHER_LOAD_LIMIT:
            out.append(f"other processes used {share:.0%} of the CPUs while {side.replace('_', ' ')} ran")
    return out


def machine_line(machine: dict[str, Any]) -> str:
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    return (f"machine: {machine['cpu']}, cores={machine['cores']} (usable {machine['usable_cores']}), "
            f"torch threads={machine['torch_threads']}{gpu}, torch {machine['torch']}, "
            f"transformers {machine['transformers']}")


def load_line(machine: dict[str, Any]) -> str:
    shares = ", ".join(f"{k[len('other_cpu_share_during_'):]} {v:.0%}" for k, v in machine.items()
                       if k.startswith("other_cpu_share_during_") and v is not None)
    return (f"load: 1-min load average {machine.get('load_avg_1m_at_start')} at start, "
            f"{machine.get('load_avg_1m_at_end')} at end; other processes' share of the CPUs: {shares or 'n/a'}")


def print_report_header(machine: dict[str, Any], warnings: Sequence[str]) -> None:
    print()
    print(machine_line(machine))
    print(load_line(machine))
    for w in warnings:
        print(f"WARNING: {w}: figures are disturbed; rerun on a quiet machine before quoting them")


# --------------------------------------------------------------------------- output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and rows != [] for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _is_number(v: Any) -> bool:
    """Numbers, missing values and ratios written like `4.08x` line up on the right."""
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return True
    if isinstance(v, str) and v.endswith("x"):
        try:
            float(v[:-1])
            return True
        except ValueError:
            return False
    return False


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0


def ratio(ours: float, baseline: float) -> float | None:
    return round(ours / baseline, 3) if baseline else None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def rel_path(path: str) -> str:
    """A path relative to the repository root when it lies inside it (for a copy-pasteable command)."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full.startswith(str(ROOT) + os.sep) else path


def command_line(argv: Sequence[str], script: str) -> str:
    """The command that reproduces this run, as it was typed (interpreter and script repo-relative)."""
    prog = sys.argv[0] if sys.argv and sys.argv[0] else script
    return shlex.join([rel_path(sys.executable), rel_path(prog), *argv])


def write_json_atomic(path: Path, data: dict) -> None:
    """Readers see the old results file or the whole new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- inputs


def bench_prompts(n: int):
    """First n//2 red-team and n - n//2 helpful prompts from the bundled train splits."""
    from jobs.config import DataConfig, PromptSource
    from jobs.data import load_prompts

    n_red, n_help = n // 2, n - n // 2
    sources = [PromptSource(source="bundled:red-team", limit=n_red), PromptSource(source="bundled:helpful", limit=n_help)]
    records, reports = load_prompts([s for s in sources if s.limit], DataConfig().max_prompt_chars)
    for rep in reports:
        log(rep.summary())
    if len(records) != n:
        most = 2 * min(rep.rows for rep in reports)
        raise SystemExit(f"asked for {n} prompts but the bundled train splits gave {len(records)} "
                         f"({n_red} red-team + {n_help} helpful wanted); use --prompts <= {most}")
    return records
