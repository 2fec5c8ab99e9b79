"""The run lock: one controller per run, takeover by the taker's own clock and one compare-and-swap, release on crash."""

from __future__ import annotations

import contextlib
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
from jobs.errors import StageFailed, StoreError, StoreUnavailable
from jobs.run_lock import LockHeld, LockLost, RunLock
from jobs.store import LocalStore

KEY = "runs/r1/lock.json"


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
    assert "\n" not in msg and f"pid {lock['owner']['pid']}" in msg and f"renewed {lock['renewed_at']}" in msg
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


class FakeTime:
    """Wall and monotonic clocks that only move when told: `advance`, or a lock's `sleep`. `wall(skew)`
    is a machine whose wall clock is `skew` seconds off; monotonic clocks all run at the same rate."""

    def __init__(self, wall: float = 1000.0, mono: float = 50.0):
        self.t_wall, self.t_mono = wall, mono

    def wall(self, skew: float = 0.0):
        return lambda: self.t_wall + skew

    def mono(self) -> float:
        return self.t_mono

    def advance(self, seconds: float) -> None:
        self.t_wall += seconds
        self.t_mono += seconds

    def sleeper(self, during=None, log: list | None = None):
        def sleep(seconds):
            if log is not None:
                log.append(seconds)
            self.advance(seconds)
            if during:
                during()
        return sleep


def lock(store, t: FakeTime, key: str = KEY, skew: float = 0.0, sleep=no_sleep, ttl_s: float = 10) -> RunLock:
    return RunLock(store, key, ttl_s=ttl_s, clock=t.wall(skew), monotonic=t.mono, sleep=sleep)


def token_in(tmp_path, key: str = KEY) -> str:
    return json.loads((tmp_path / key).read_text())["token"]


def test_a_live_holder_makes_the_second_controller_fail_fast(tmp_path):
    store, t = LocalStore(tmp_path), FakeTime()
    holder = lock(store, t)
    holder.acquire()
    t.advance(4)  # renewed 4 s ago
    with pytest.raises(LockHeld, match="is locked by"):
        lock(store, t).acquire()


def test_a_stale_lock_is_taken_over_only_after_a_full_lease_unchanged_on_the_takers_clock(tmp_path):
    store, t = LocalStore(tmp_path), FakeTime()
    holder = lock(store, t)
    holder.acquire()  # then it dies: no more renewals
    t.advance(6)  # not renewed for 6 s of a 10 s lease: stale, so watch it
    slept: list = []
    taker = lock(store, t, sleep=t.sleeper(log=slept))
    taker.acquire()
    assert sum(slept) == 12.5 and max(slept) == 2.5  # a lease plus the grace, looking every quarter lease
    assert token_in(tmp_path) == taker.token
    holder.renew()  # the old holder wakes up: past its own lease it never writes, and learns it lost
    assert holder.lost.is_set()
    with pytest.raises(LockLost):
        holder.check()
    holder.release()  # must not delete the new holder's lock
    assert token_in(tmp_path) == taker.token


def test_a_holder_that_renews_while_watched_keeps_its_lock(tmp_path):
    store, t = LocalStore(tmp_path), FakeTime()
    slow = lock(store, t)
    slow.acquire()
    t.advance(6)  # late with its heartbeats, but alive
    with pytest.raises(LockHeld, match="renewed while we waited"):
        lock(store, t, sleep=t.sleeper(during=slow.renew)).acquire()
    assert not slow.lost.is_set() and token_in(tmp_path) == slow.token


@pytest.mark.parametrize("skew", [-30.0, 30.0])
def test_30s_clock_skew_never_takes_a_live_lock(tmp_path, skew):
    """The holder's wall clock is 30 s behind (its records look old) or ahead (they look new): either
    way a live holder keeps its lock, because the takeover waits on the taker's own monotonic clock."""
    store, t = LocalStore(tmp_path), FakeTime()
    holder = lock(store, t, skew=skew)
    holder.acquire()
    beats = []

    def heartbeat():  # the holder's heartbeat, every quarter lease
        beats.append(1)
        holder.renew()

    with pytest.raises(LockHeld):
        lock(store, t, sleep=t.sleeper(during=heartbeat)).acquire()
    assert token_in(tmp_path) == holder.token and not holder.lost.is_set()
    assert beats == ([1] if skew < 0 else [])  # behind: watched until it renewed; ahead: failed fast


def test_a_dead_holder_with_a_fast_clock_is_still_taken_over(tmp_path):
    """Its records claim renewals 30 s in the future: fail fast until the hint says stale, then the
    full lease unchanged on our clock."""
    store, t = LocalStore(tmp_path), FakeTime()
    lock(store, t, skew=30.0).acquire()
    with pytest.raises(LockHeld):
        lock(store, t).acquire()
    t.advance(36)
    taker = lock(store, t, sleep=t.sleeper())
    taker.acquire()
    assert token_in(tmp_path) == taker.token


def test_two_takers_of_one_stale_lock_one_wins(tmp_path):
    store, t = LocalStore(tmp_path), FakeTime()
    lock(store, t).acquire()
    stale = (tmp_path / KEY).read_bytes()
    a, b = lock(store, t), lock(store, t)
    # both watched the same record for a full lease; a's compare-and-swap lands first
    assert a._take_over(stale, json.loads(stale)) is True
    with pytest.raises(LockHeld, match="took it over first"):
        b._take_over(stale, json.loads(stale))
    assert token_in(tmp_path) == a.token


def test_two_identical_unreadable_locks_are_taken_over_at_once(tmp_path):
    """An empty lock file (a power loss), twice in a row with the same bytes: replaced without waiting."""
    store, t = LocalStore(tmp_path), FakeTime()
    for _ in range(2):
        store.write_bytes(KEY, b"")
        taker = lock(store, t)
        taker.acquire()
        assert token_in(tmp_path) == taker.token
        taker.release()
    assert store.list("runs/r1") == []


class FlakyStore(LocalStore):
    """Its next `fail` calls raise a transport error (a connection reset, a timeout); `down` fails all."""

    fail = 0
    down = False

    def _maybe_fail(self, key):
        if self.down or self.fail:
            self.fail = max(self.fail - 1, 0)
            raise StoreUnavailable(f"{key}: connection reset (injected)")

    def read_bytes(self, key):
        self._maybe_fail(key)
        return super().read_bytes(key)

    def replace_if(self, key, data, expected):
        self._maybe_fail(key)
        return super().replace_if(key, data, expected)


def test_one_failed_call_during_renewal_is_no_evidence_of_loss(tmp_path):
    store, t = FlakyStore(tmp_path), FakeTime()
    held = lock(store, t, ttl_s=30)
    held.acquire()
    store.fail = 1
    with pytest.raises(StoreError):
        held.renew()  # the heartbeat catches this and retries within the lease
    assert not held.lost.is_set()
    held.check()
    t.advance(5)
    before = held.deadline
    held.renew()
    assert held.deadline == before + 5 and not held.lost.is_set()


def test_a_60s_brownout_ends_in_exit_75_and_a_clean_takeover(tmp_path):
    """The store fails every call for 60 s: renewals fail (retried, no evidence), the lease lapses on the
    holder's own clock, `check()` raises LockLost with the retryable exit code, and once the store is back
    a restarted controller takes the untouched record over after a lease."""
    store, t = FlakyStore(tmp_path), FakeTime()
    held = lock(store, t, ttl_s=40)
    held.acquire()
    store.down = True
    for _ in range(6):  # the heartbeat every 10 s through the brownout
        t.advance(10)
        with contextlib.suppress(StoreError):
            held.renew()
    with pytest.raises(LockLost) as lost:
        held.check()
    assert lost.value.exit_code == 75
    held.release()  # past its lease it leaves the record alone (and the store is down anyway)
    store.down = False
    assert token_in(tmp_path) == held.token
    restarted = lock(store, t, ttl_s=40, sleep=t.sleeper())
    restarted.acquire()  # 60 s old by its timestamps: watched for a lease, unchanged, taken over
    assert token_in(tmp_path) == restarted.token


def test_renew_notices_a_foreign_token_without_writing(tmp_path):
    store = LocalStore(tmp_path)
    held = RunLock(store, KEY, ttl_s=30)
    held.acquire()
    store.write_bytes(KEY, json.dumps({"token": "someone-else", "expires_at_epoch": time.time() + 30}).encode())
    held.renew()
    assert held.lost.is_set()
    assert token_in(tmp_path) == "someone-else"


def test_the_lease_is_sized_from_the_stores_worst_call():
    from jobs.run_lock import TTL_S, lease_for

    class Slow(LocalStore):
        def worst_call_s(self):
            return 51.0  # the S3 lock client: 3 tries x (5 s connect + 10 s read) + 6 s of backoff

    assert lease_for(LocalStore("/nonexistent")) == TTL_S
    assert lease_for(Slow("/nonexistent")) == 102.0
    assert RunLock(Slow("/nonexistent"), KEY).ttl_s == 102.0


def test_lock_on_s3(s3_bucket, tmp_path):
    """Create-only on S3 is a conditional PUT: the same fail-fast and takeover behaviour."""
    from jobs.store_s3 import S3Store

    store = S3Store(f"s3://{s3_bucket}/cai", cache_root=tmp_path / "cache")
    t = FakeTime()
    holder = lock(store, t)
    holder.acquire()
    assert holder.store is not store and holder.store.worst_call_s() == 51.0  # its own short-timeout client
    with pytest.raises(LockHeld, match=f"s3://{s3_bucket}/cai/{KEY}: run is locked by"):
        lock(store, t).acquire()
    t.advance(6)
    holder.renew()  # a compare-and-swap on S3: PUT If-Match
    assert store.read_json(KEY)["renewed_at_epoch"] == t.t_wall
    t.advance(20)
    taker = lock(store, t, sleep=t.sleeper())
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
    t = FakeTime()
    held = lock(LocalStore(tmp_path), t)
    held.acquire()
    t.advance(9.9)
    held.check()
    t.advance(0.1)  # our own lease is over: nobody may have taken it yet, but we must not assume so
    with pytest.raises(LockLost, match="expired or was taken over"):
        held.check()
    held.release()  # past our lease the record may be someone else's: left alone
    assert token_in(tmp_path) == held.token


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
        first = lock.deadline
        time.sleep(3.5)  # without the retries, two failed beats would leave 2 s of lease; with them it is renewed
        assert not lock.lost.is_set() and store.fail == 0 and lock.deadline > first + 1.5
        lock.check()
