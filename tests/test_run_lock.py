"""The run lock: one controller per run, expiry takeover fenced by create-only writes, release on crash."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time

import pytest

import jobs.controller
from jobs.config import RunConfig
from jobs.controller import Controller
from jobs.errors import StageFailed, StoreError
from jobs.run_lock import LockHeld, LockLost, RunLock
from jobs.store import LocalStore

KEY = "runs/r1/lock.json"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class GatedExecutor:
    """Blocks inside the first stage until the test lets it go, then fails it (a crash mid-run)."""

    def __init__(self):
        self.entered, self.go = threading.Event(), threading.Event()
        self.on_hold = None

    def run(self, stage: str, spec_uri: str) -> str:
        self.entered.set()
        assert self.go.wait(30)
        if self.on_hold:
            return self.on_hold()
        raise StageFailed(f"{stage}: killed by the test")


def config() -> RunConfig:
    # the bundled model is known by its pinned digest: the controller never loads it, and the gated executor runs no stage
    return RunConfig(name="lock", stages=["generate"], data={"train": [{"source": "bundled:helpful", "limit": 2}]})


def start(controller: Controller) -> tuple[threading.Thread, list]:
    outcome: list = []

    def target():
        try:
            outcome.append(controller.run())
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, outcome


def test_second_controller_fails_fast_and_a_crash_releases_the_lock(tmp_path):
    store = LocalStore(tmp_path)
    first_exec = GatedExecutor()
    first = Controller(config(), store, first_exec, run_id="r1")
    thread, outcome = start(first)
    assert first_exec.entered.wait(30)
    lock = json.loads((tmp_path / KEY).read_text())
    before = (tmp_path / "runs/r1/run.json").read_text()

    second = Controller(config(), store, GatedExecutor(), run_id="r1")
    t0 = time.monotonic()
    with pytest.raises(LockHeld) as err:
        second.run()
    assert time.monotonic() - t0 < 2  # fails fast, does not wait
    msg = str(err.value)
    assert "\n" not in msg and f"pid {lock['owner']['pid']}" in msg and f"until {lock['expires_at']}" in msg
    assert (tmp_path / "runs/r1/run.json").read_text() == before  # the loser wrote nothing

    first_exec.go.set()
    thread.join(30)
    assert isinstance(outcome[0], StageFailed)
    assert not (tmp_path / KEY).exists()  # released although the run crashed
    assert json.loads((tmp_path / "runs/r1/run.json").read_text())["status"] == "failed"
    with RunLock(store, KEY):  # and the run can be taken up again at once
        pass


def test_lost_lock_stops_the_controller_from_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs.controller, "RunLock", functools.partial(RunLock, ttl_s=0.4))
    store = LocalStore(tmp_path)
    gated = GatedExecutor()
    thread, outcome = start(Controller(config(), store, gated, run_id="r1"))
    assert gated.entered.wait(30)
    # another controller takes the lock while this one is stuck in a stage
    store.delete(KEY)
    assert store.create_only(KEY, json.dumps({"token": "other", "owner": {"pid": 1}, "expires_at_epoch": time.time() + 99}).encode())
    time.sleep(0.5)  # at least one heartbeat sees the foreign token
    run_json = (tmp_path / "runs/r1/run.json").read_text()
    gated.on_hold = lambda: ""  # the stage "finishes"; the controller's next save must refuse
    gated.go.set()
    thread.join(30)
    assert isinstance(outcome[0], LockLost) and "taken over" in str(outcome[0])
    assert (tmp_path / "runs/r1/run.json").read_text() == run_json  # the new holder's run.json is untouched
    assert json.loads((tmp_path / KEY).read_text())["token"] == "other"  # and its lock too


def test_heartbeat_renews_and_exit_releases(tmp_path):
    store = LocalStore(tmp_path)
    with RunLock(store, KEY, ttl_s=0.4) as lock:
        first = json.loads((tmp_path / KEY).read_text())["expires_at_epoch"]
        time.sleep(0.8)
        rec = json.loads((tmp_path / KEY).read_text())
        assert rec["expires_at_epoch"] > first and rec["token"] == lock.token
        lock.check()  # still ours
        with pytest.raises(LockHeld):
            RunLock(store, KEY, ttl_s=0.4).acquire()  # kept alive past the first expiry
    assert not (tmp_path / KEY).exists()


def no_sleep(seconds):
    raise AssertionError(f"must not wait (asked for {seconds}s)")


def test_expired_lock_is_taken_over_after_the_grace(tmp_path):
    store = LocalStore(tmp_path)
    clock = Clock()
    holder = RunLock(store, KEY, ttl_s=10, clock=clock)
    holder.acquire()  # at 1000: expires 1010, may be taken over from 1012.5
    taker = RunLock(store, KEY, ttl_s=10, clock=clock, sleep=no_sleep)
    clock.t = 1004.0  # renewed 4 s ago: a live holder, fail fast
    with pytest.raises(LockHeld):
        taker.acquire()
    clock.t = 1013.0
    taker.acquire()
    rec = json.loads((tmp_path / KEY).read_text())
    assert rec["token"] == taker.token and rec["expires_at_epoch"] == 1023.0
    assert not store.exists(f"{KEY}.takeover-{holder.token}")  # the marker let exactly one taker in, then went

    holder.renew()  # the old holder wakes up: past its own expiry it never writes, and learns it lost
    assert holder.lost.is_set()
    with pytest.raises(LockLost):
        holder.check()
    holder.release()  # must not delete the new holder's lock
    assert json.loads((tmp_path / KEY).read_text())["token"] == taker.token


def test_a_stale_lock_is_waited_out_unless_its_holder_comes_back(tmp_path):
    store = LocalStore(tmp_path)
    clock = Clock()
    holder = RunLock(store, KEY, ttl_s=10, clock=clock)
    holder.acquire()
    slept = []

    def sleep(seconds):  # the holder stays silent while we wait
        slept.append(seconds)
        clock.t += seconds

    clock.t = 1006.0  # two heartbeats missed (stale), not yet expired
    taker = RunLock(store, KEY, ttl_s=10, clock=clock, sleep=sleep)
    taker.acquire()
    assert slept == [6.5] and json.loads((tmp_path / KEY).read_text())["token"] == taker.token

    clock.t = 2000.0
    back = RunLock(store, "runs/r2/lock.json", ttl_s=10, clock=clock)
    back.acquire()  # expires 2010

    def holder_returns(seconds):  # a slow holder renews while we wait: it is live, so fail fast
        clock.t += 1
        back.renew()

    clock.t = 2006.0
    with pytest.raises(LockHeld, match="until"):
        RunLock(store, "runs/r2/lock.json", ttl_s=10, clock=clock, sleep=holder_returns).acquire()
    assert not back.lost.is_set() and json.loads((tmp_path / "runs/r2/lock.json").read_text())["token"] == back.token


def test_two_takers_of_one_expired_lock_one_wins(tmp_path):
    store = LocalStore(tmp_path)
    clock = Clock()
    RunLock(store, KEY, ttl_s=10, clock=clock).acquire()
    expired = json.loads((tmp_path / KEY).read_text())
    clock.t = 2000.0
    a, b = RunLock(store, KEY, ttl_s=10, clock=clock), RunLock(store, KEY, ttl_s=10, clock=clock)
    # both read the same expired record; a gets through first
    a._take_over(expired)
    with pytest.raises(LockHeld, match="is locked by"):  # b finds a's fresh lock, not the expired one
        b._take_over(expired)
    assert json.loads((tmp_path / KEY).read_text())["token"] == a.token
    # mid-takeover, a's marker keeps b out; a marker left by a taker that died is a lease old and counts for nothing
    marker = f"{KEY}.takeover-{expired['token']}"
    store.write_bytes(marker, json.dumps({"at_epoch": clock.t}).encode())
    with pytest.raises(LockHeld, match="another controller is taking it over"):
        b._take_over(expired)
    clock.t += 13
    store.write_bytes(KEY, json.dumps(expired).encode())
    b._take_over(expired)
    assert json.loads((tmp_path / KEY).read_text())["token"] == b.token and not store.exists(marker)


def test_unreadable_locks_can_always_be_taken_over(tmp_path):
    """An empty lock file (a power loss) twice in a row: the same content-derived token both times."""
    store = LocalStore(tmp_path)
    for _ in range(2):
        store.write_bytes(KEY, b"")
        lock = RunLock(store, KEY, ttl_s=10, sleep=no_sleep)
        lock.acquire()
        assert json.loads((tmp_path / KEY).read_text())["token"] == lock.token
        lock.release()
    assert store.list("runs/r1") == []


class FlakyStore(LocalStore):
    """Its next `fail` reads raise a transport error (a connection reset, a timeout)."""

    fail = 0

    def read_bytes(self, key):
        if self.fail:
            self.fail -= 1
            raise StoreError(f"{key}: connection reset (injected)")
        return super().read_bytes(key)


def test_one_failed_read_during_renewal_is_no_evidence_of_loss(tmp_path):
    store = FlakyStore(tmp_path)
    lock = RunLock(store, KEY, ttl_s=30)
    lock.acquire()
    store.fail = 1
    with pytest.raises(StoreError):
        lock.renew()  # the heartbeat catches this and retries within the lease
    assert not lock.lost.is_set()
    lock.check()
    before = lock.expires_at
    lock.renew()
    assert lock.expires_at >= before and not lock.lost.is_set()


def test_renew_notices_a_foreign_token_without_writing(tmp_path):
    store = LocalStore(tmp_path)
    lock = RunLock(store, KEY, ttl_s=30)
    lock.acquire()
    store.write_bytes(KEY, json.dumps({"token": "someone-else", "expires_at_epoch": time.time() + 30}).encode())
    lock.renew()
    assert lock.lost.is_set()
    assert json.loads((tmp_path / KEY).read_text())["token"] == "someone-else"


def test_lock_on_s3(s3_bucket, tmp_path):
    """Create-only on S3 is a conditional PUT: the same fail-fast and takeover behaviour."""
    from jobs.store_s3 import S3Store

    store = S3Store(f"s3://{s3_bucket}/cai", cache_root=tmp_path / "cache")
    clock = Clock()
    holder = RunLock(store, KEY, ttl_s=10, clock=clock)
    holder.acquire()
    with pytest.raises(LockHeld, match=f"s3://{s3_bucket}/cai/{KEY}: run is locked by"):
        RunLock(store, KEY, ttl_s=10, clock=clock).acquire()
    clock.t += 20
    taker = RunLock(store, KEY, ttl_s=10, clock=clock)
    taker.acquire()
    assert store.read_json(KEY)["token"] == taker.token
    holder.release()  # the old holder's release leaves the new lock alone
    assert store.read_json(KEY)["token"] == taker.token
    taker.release()
    assert not store.exists(KEY)


def test_cli_exit_code_is_retryable_while_locked(tmp_path, capsys):
    from jobs.cli import main

    store = LocalStore(tmp_path)
    with RunLock(store, KEY):
        assert main(["run", "--store", str(tmp_path), "--run-id", "r1"]) == 75  # not 1/2: the controller Job retries
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "run r1 is locked by" in err


@pytest.mark.skipif(signal.getsignal(signal.SIGTERM) != signal.SIG_DFL, reason="SIGTERM already handled by the test runner")
def test_sigterm_unwinds_and_releases(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with RunLock(store, KEY):
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGTERM)  # what Kubernetes sends a pod it stops
            time.sleep(10)
    assert not (tmp_path / KEY).exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_check_fences_a_lapsed_lock_even_without_a_heartbeat(tmp_path):
    clock = Clock()
    lock = RunLock(LocalStore(tmp_path), KEY, ttl_s=10, clock=clock)
    lock.acquire()
    clock.t = 1009.9
    lock.check()
    clock.t = 1010.0  # our own lease is over: nobody may have taken it yet, but we must not assume so
    with pytest.raises(LockLost, match="expired or was taken over"):
        lock.check()


def test_a_holder_that_died_on_this_host_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    store = LocalStore(tmp_path)
    holder = RunLock(store, KEY)
    holder.owner = {**holder.owner, "pid": int(dead.stdout), "pod": None}  # what a `kill -9`ed controller leaves
    holder.acquire()
    taker = RunLock(store, KEY, sleep=no_sleep)
    taker.acquire()  # fresh lease, but its process is gone: no waiting
    assert json.loads((tmp_path / KEY).read_text())["token"] == taker.token
    alive = RunLock(store, "runs/r2/lock.json")
    alive.acquire()  # this process: alive, so a second one fails fast
    with pytest.raises(LockHeld):
        RunLock(store, "runs/r2/lock.json", sleep=no_sleep).acquire()


def test_the_heartbeat_retries_a_failed_renewal_within_the_lease(tmp_path):
    store = FlakyStore(tmp_path)
    with RunLock(store, KEY, ttl_s=4) as lock:  # a beat every second
        store.fail = 2
        first = lock.expires_at
        time.sleep(3.5)  # without the retries, two failed beats would leave 2 s of lease; with them it is renewed
        assert not lock.lost.is_set() and store.fail == 0 and lock.expires_at > first + 1.5
        lock.check()
