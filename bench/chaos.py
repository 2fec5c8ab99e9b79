"""Chaos: a real pipeline on the bundled model against a real S3 server, killed again and again.

One uninterrupted `cai run` is the reference; its outputs are kept and the bucket emptied. Then the same
config runs into the same store again while this script SIGKILLs, at random moments, the controller (its stage process, orphaned,
runs on) or, separately, the stage process it is waiting for, and once stops the S3 server (SIGSTOP)
for longer than a lock lease. After each kill or exit it starts `cai run` again, as a controller Job's
retry would, until the run finishes. Then:

- the final sft.jsonl, prefs.jsonl and both report.json must be byte-identical to the reference's;
- no finished stage may run twice: every stage.json keeps the writer token it was first seen with.

    python bench/chaos.py --kills 10 --seed 0

The S3 clients run with AWS_MAX_ATTEMPTS=1, so the lock's lease is its 40 s floor (`lease_for`) and
the pause (50 s) outlasts it: the controller loses its lock, exits 75, and the next start takes over.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import command_line, format_table, log, machine_info, now_iso, write_json_atomic  # noqa: E402
from tests.s3_server import start_server, stop_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = """
name: chaos
model: bundled:smollm2-135m-instruct
constitution: default
data:
  train:
    - {source: bundled:red-team, limit: 4}
    - {source: bundled:helpful, limit: 4}
engine: {batch_size: 8}
generate: {revision_rounds: 1, few_shot: 0, max_new_tokens: 24, critique_max_new_tokens: 16}
judge: {min_margin: 0.0, verified_pairs: true}
train:
  sft: {epochs: 1, batch_size: 4, max_length: 192}
  dpo: {epochs: 1, batch_size: 4, max_length: 192}
evaluate: {limit: 4, max_new_tokens: 16, jailbreaks: null, with_system_prompt: false}
stages: [generate, judge, train, evaluate]
rounds: 1
"""
COMPARED = ["base/evaluate/report.json", "round-1/generate/sft.jsonl", "round-1/judge/prefs.jsonl", "round-1/evaluate/report.json"]
PAUSE_S = 50.0  # longer than the 40 s lease the lock gets with AWS_MAX_ATTEMPTS=1


def cai_run(store: str, config: Path, env: dict[str, str], logf) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", "-c", str(config), "--store", store], cwd=REPO, env=env,
                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)


def children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(x) for x in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def run_root(client, bucket: str) -> str:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="cai/runs/")
            for o in page.get("Contents", [])]
    return next(k for k in keys if k.endswith("/run.json")).rsplit("/", 1)[0]


def manifests(client, bucket: str) -> dict[str, str]:
    """stage.json key -> its writer token, for every finished stage (and shard) in the bucket."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="cai/runs/"):
        for o in page.get("Contents", []):
            if o["Key"].endswith("/stage.json"):
                with_body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                out[o["Key"]] = json.loads(with_body).get("writer") or with_body.hex()[:32]
    return out


def differing_bytes(a: bytes, b: bytes) -> int:
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs in all (controller and stage alternately)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-pause", action="store_true", help="skip the S3 pause")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    server = start_server()
    work = Path(tempfile.mkdtemp(prefix="cai-chaos-"))
    config = work / "chaos.yaml"
    config.write_text(CONFIG)
    env = {**os.environ, **server.env, "AWS_MAX_ATTEMPTS": "1", "CAI_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    s3 = server.admin()
    s3.create_bucket(Bucket="chaos")
    store = "s3://chaos/cai"  # both runs use the same store URI, so the same run id: their bytes compare as they are
    try:
        log("reference run (uninterrupted)")
        t0 = time.monotonic()
        with open(work / "reference.log", "wb") as f:
            ref = cai_run(store, config, env, f)
            if ref.wait() != 0:
                raise SystemExit(f"error: the reference run failed; see {work / 'reference.log'}")
        ref_s = time.monotonic() - t0
        log(f"reference: {ref_s:.0f}s")
        root = run_root(s3, "chaos")
        reference = {rel: s3.get_object(Bucket="chaos", Key=f"{root}/{rel}")["Body"].read() for rel in COMPARED}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="chaos"):  # then start again from nothing
            for o in page.get("Contents", []):
                s3.delete_object(Bucket="chaos", Key=o["Key"])

        kills = {"controller": 0, "stage": 0}
        starts, exits, paused, orphans = 0, {}, False, []
        seen: dict[str, str] = {}
        rewritten: set[str] = set()
        done = False
        with open(work / "chaos.log", "wb") as f:
            while not done:
                for key, writer in manifests(s3, "chaos").items():  # no finished stage may be written again
                    if seen.setdefault(key, writer) != writer:
                        rewritten.add(key)
                proc = cai_run(store, config, env, f)
                starts += 1
                total = sum(kills.values())
                pause_now = not args.no_pause and not paused and starts == 3
                if total < args.kills or pause_now:
                    deadline = time.monotonic() + rng.uniform(3.0, max(6.0, 0.35 * ref_s))
                    while proc.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.2)
                    if proc.poll() is None and pause_now:
                        log(f"start {starts}: S3 server stopped for {PAUSE_S:.0f}s")
                        os.killpg(server.proc.pid, signal.SIGSTOP)
                        time.sleep(PAUSE_S)
                        os.killpg(server.proc.pid, signal.SIGCONT)
                        paused = True
                    elif proc.poll() is None:
                        target = "controller" if total % 2 == 0 else "stage"
                        stage_pids = [c for c in children(proc.pid) if alive(c)]
                        if target == "stage" and stage_pids:
                            os.kill(stage_pids[0], signal.SIGKILL)
                        else:
                            target = "controller"
                            orphans += stage_pids  # the stage runs on without its controller, as a pod would
                            os.kill(proc.pid, signal.SIGKILL)
                        kills[target] += 1
                        log(f"start {starts}: killed the {target} ({sum(kills.values())}/{args.kills})")
                code = proc.wait()
                exits[code] = exits.get(code, 0) + 1
                done = code == 0
                if not done and code not in (1, 75, -signal.SIGKILL):
                    raise SystemExit(f"error: cai run exited {code}; see {work / 'chaos.log'}")
            while any(alive(p) for p in orphans):  # let orphaned stages finish before comparing
                time.sleep(0.5)
        for key, writer in manifests(s3, "chaos").items():
            if seen.setdefault(key, writer) != writer:
                rewritten.add(key)

        assert run_root(s3, "chaos") == root
        diffs = {rel: differing_bytes(reference[rel], s3.get_object(Bucket="chaos", Key=f"{root}/{rel}")["Body"].read())
                 for rel in COMPARED}
        rows = [
            ["SIGKILLs of the controller", kills["controller"], ""],
            ["SIGKILLs of a stage", kills["stage"], ""],
            ["S3 server paused longer than a lease", int(paused), f"{PAUSE_S:.0f} s"],
            ["cai run starts (resumes + 1)", starts, ", ".join(f"exit {k}: {v}" for k, v in sorted(exits.items()))],
            ["finished stages written twice", len(rewritten), "expected 0"],
            *[[f"bytes differing: {rel}", n, "expected 0"] for rel, n in diffs.items()],
        ]
        print(format_table(["chaos", "count", "note"], rows))
        write_json_atomic(REPO / "bench" / "results" / "chaos.json", {
            "date": now_iso(), "machine": machine_info(), "command": command_line(argv or sys.argv[1:], "bench/chaos.py"), "kills": kills, "paused": paused, "starts": starts, "exits": exits, "rewritten": sorted(rewritten),
                               "differing_bytes": diffs, "reference_s": ref_s, "seed": args.seed})
        return 0 if not rewritten and not any(diffs.values()) else 1
    finally:
        with_orphans = [p for p in locals().get("orphans", []) if alive(p)]
        for p in with_orphans:
            os.kill(p, signal.SIGKILL)
        stop_server(server)


if __name__ == "__main__":
    raise SystemExit(main())
