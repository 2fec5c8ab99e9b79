"""A lease in the artifact store: one controller drives a run (and one realign tick the pointer) at a time.

The lock is an object (`runs/<id>/lock.json`, `models/realign.lock`) naming its holder and a token. The
holder creates it create-only, a heartbeat thread renews it every quarter lease, and the holder deletes
it at the end, also when it crashes (context manager; SIGTERM becomes an interrupt so pods release too).
Every write after the first is a compare-and-swap by content (`replace_if`: PUT If-Match on S3, a flock
on a local directory), so a renewal or a takeover lands only on the exact record its writer read.

- **Fail fast.** A second controller that finds a record renewed recently by the wall-clock fields in
  it fails at once with the holder's name. Failing is always safe, so skewed clocks can only make it
  fail when it might have waited.
- **Expiry by the taker's own clock.** Taking over is the dangerous decision, so it never compares two
  machines' wall clocks: the taker watches the record on its own monotonic clock, and takes over only
  when the record stayed byte for byte the same for a full lease plus a grace. A holder that is alive
  renews within a quarter lease, the record changes and the taker fails fast.
- **The holder's own lease** is also on its monotonic clock: it never renews past it, and `check()`
  raises LockLost once it has passed without a renewal landing. So a holder that stalled longer than
  its lease stops before a taker (who waited longer still) can have started.
- **One taker.** The takeover is one compare-and-swap of the stale record for ours: of many takers one
  wins, the others see a changed record and fail fast. An unreadable record (an empty file after a
  power loss) is replaced the same way, so it never wedges the run.
- **Transient store errors are no evidence.** A failed renewal is retried within the lease (1, 2, 4 s
  ...); only another token in the record, or the lease passing, means the lock is lost.
- **The lease is sized from the store** (`ArtifactStore.worst_call_s`): at least twice the longest one
  call may take with its retries. On S3 the lock has its own client with short timeouts and 3 tries
  (~51 s worst case, a 102 s lease); the heartbeat retries a failed renewal rather than botocore.

If the store cannot compare-and-swap, the lock refuses to start (`check_conditional_writes`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from .errors import EX_TEMPFAIL, CaiError, NotFound
from .store import ArtifactStore

TTL_S = 40.0  # the shortest lease: a holder killed without cleanup blocks the run for about this plus the grace
HEARTBEAT_FRACTION = 0.25  # renew every quarter lease: three heartbeats can fail before the lease lapses
GRACE_FRACTION = 0.25  # the taker waits this much longer than a lease: clock rates and scheduling differ a little
STALE_FRACTION = 0.5  # a record not renewed for half a lease (two heartbeats) by its own timestamps: watch it
CALLS_PER_LEASE = 2  # the lease covers two worst-case store calls: one renewal may fail outright and its retry still land


def lease_for(store: ArtifactStore, floor_s: float = TTL_S) -> float:
    """The lease: TTL_S, or longer where two store calls with their retries could outlast it."""
    return max(floor_s, CALLS_PER_LEASE * store.worst_call_s())


class LockHeld(CaiError):
    """Another live controller holds the lock."""

    exit_code = EX_TEMPFAIL


class LockLost(CaiError):
    """This controller's lock expired or was taken over while it ran."""

    exit_code = EX_TEMPFAIL


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def owner_info() -> dict[str, Any]:
    """Who holds the lock: enough for a person to find the process (pod name on Kubernetes)."""
    host = socket.gethostname()
    return {"host": host, "pid": os.getpid(), "pod": os.environ.get("POD_NAME") or None}


def holder_is_dead_here(owner: dict[str, Any]) -> bool:
    """The holder ran on this host (not in a pod) and its process is gone."""
    if owner.get("pod") or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def describe_owner(owner: dict[str, Any]) -> str:
    where = f"pod {owner['pod']}" if owner.get("pod") else f"host {owner.get('host', '?')}"
    return f"{where} pid {owner.get('pid', '?')}"


class RunLock:
    """`with RunLock(store, key):` holds the lease for the block; `check()` raises if it was lost."""

    def __init__(self, store: ArtifactStore, key: str, ttl_s: float | None = None, purpose: str = "run",
                 clock=time.time, sleep=time.sleep, monotonic=time.monotonic):
        self.store, self.key, self.purpose = store.for_control(), key, purpose
        self.ttl_s = ttl_s if ttl_s is not None else lease_for(self.store)
        self.clock, self.sleep, self.monotonic = clock, sleep, monotonic
        self.grace_s = self.ttl_s * GRACE_FRACTION
        self.token = uuid.uuid4().hex
        self.owner = owner_info()
        self.acquired_at: float | None = None
        self.deadline = 0.0  # our lease's end, on our monotonic clock
        self._record = b""  # the bytes we last wrote: what our next compare-and-swap expects
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_sigterm = None

    # --- the lock object ----------------------------------------------------------------------
    def _record_bytes(self) -> bytes:
        now = self.clock()  # wall clock: for people reading the record and for the fail-fast hint only
        return json.dumps({
            "token": self.token, "owner": self.owner, "purpose": self.purpose, "ttl_s": self.ttl_s,
            "acquired_at": _iso(self.acquired_at or now), "renewed_at": _iso(now),
            "expires_at": _iso(now + self.ttl_s), "expires_at_epoch": now + self.ttl_s, "renewed_at_epoch": now,
        }, indent=2, sort_keys=True).encode() + b"\n"

    def _write(self, expected: bytes | None) -> bool:
        """Our record, create-only (`expected` None) or in place of `expected`. The lease counts from
        before the write, and is believed only once the write has landed."""
        started = self.monotonic()
        data = self._record_bytes()
        ok = self.store.create_only(self.key, data) if expected is None else self.store.replace_if(self.key, data, expected)
        if ok:
            self._record, self.deadline = data, started + self.ttl_s
        return ok

    def _read_raw(self) -> bytes | None:
        """The record's bytes, or None when it is not there. A transport error raises: no evidence either way."""
        try:
            return self.store.read_bytes(self.key)
        except NotFound:
            return None

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any] | None:
        """The record, or None if it is not one (empty, cut short): such a record can always be replaced."""
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return rec if isinstance(rec, dict) and "token" in rec else None

    def _held_error(self, rec: dict[str, Any], why: str = "") -> LockHeld:
        return LockHeld(
            f"{self.store.uri_for(self.key)}: {self.purpose} is locked by {describe_owner(rec.get('owner', {}))} "
            f"since {rec.get('acquired_at', '?')}, renewed {rec.get('renewed_at', '?')}{why}; "
            "wait for it to finish, or re-run in a minute if it has died"
        )

    def acquire(self) -> None:
        """Create the lock; or fail fast while its holder renews; or watch a stale one for a full lease on
        our own clock and take it over; or replace an unreadable one at once."""
        for _ in range(5):  # a lock that vanishes between our create and read: retry a few times
            self.acquired_at = self.clock()
            if self._write(None):
                return
            raw = self._read_raw()
            if raw is None:
                continue
            rec = self._parse(raw)
            if rec is None or holder_is_dead_here(rec.get("owner", {})):
                if self._take_over(raw, rec):  # unreadable, or its holder died on this very host (Ctrl-C, SIGKILL)
                    return
                continue
            if self.clock() - float(rec.get("renewed_at_epoch", 0.0)) < self.ttl_s * STALE_FRACTION:
                raise self._held_error(rec)
            if self._watch(raw, rec) and self._take_over(raw, rec):
                return
        raise LockHeld(f"{self.store.uri_for(self.key)}: {self.purpose} lock keeps changing hands; retry later")

    def _watch(self, raw: bytes, rec: dict[str, Any]) -> bool:
        """True once `raw` stayed unchanged for a lease plus the grace, by our monotonic clock; raises
        LockHeld as soon as the record changes (its holder renewed, or someone else took it)."""
        wait = self.ttl_s + self.grace_s
        print(f"[cai] {self.store.uri_for(self.key)}: {describe_owner(rec.get('owner', {}))} has not renewed its lock since "
              f"{rec.get('renewed_at', '?')}; taking it over if it stays unchanged for {wait:.0f}s", file=sys.stderr, flush=True)
        start = self.monotonic()
        while (left := start + wait - self.monotonic()) > 0:
            self.sleep(min(self.ttl_s * HEARTBEAT_FRACTION, left))
            now_raw = self._read_raw()
            if now_raw is None:
                return False  # released meanwhile: try to create it
            if now_raw != raw:
                raise self._held_error(self._parse(now_raw) or rec, " (it renewed while we waited)")
        return True

    def _take_over(self, raw: bytes, rec: dict[str, Any] | None) -> bool:
        """One compare-and-swap of the stale record for ours. False: it is gone (create it instead)."""
        self.acquired_at = self.clock()
        if self._write(raw):
            return True
        now_raw = self._read_raw()
        if now_raw is None:
            return False
        raise self._held_error(self._parse(now_raw) or rec or {}, " (another controller took it over first)")

    def renew(self) -> None:
        """Push the lease forward, in place of our own last record only (else mark it lost)."""
        if self.monotonic() >= self.deadline:  # never renew a lease that may already have been taken
            self.lost.set()
            return
        if self._write(self._record):
            return
        raw = self._read_raw()
        rec = self._parse(raw) if raw is not None else None
        if rec is None or rec.get("token") != self.token:
            self.lost.set()

    def release(self) -> None:
        """Delete our record, while our lease lasts: after it, a taker may already hold the key."""
        if self.monotonic() < self.deadline and self._read_raw() == self._record:
            self.store.delete(self.key)

    def check(self) -> None:
        """Raise if the lock was taken over or, by our own clock, has lapsed (whatever the heartbeat did)."""
        if self.lost.is_set() or self.monotonic() >= self.deadline:
            self.lost.set()
            raise LockLost(
                f"{self.store.uri_for(self.key)}: this controller's {self.purpose} lock expired or was taken over "
                f"(no renewal landed within its {self.ttl_s:g}s lease); another controller may be driving it, so this one stops"
            )

    # --- heartbeat and context manager --------------------------------------------------------
    def _beat(self) -> None:
        """Renew every interval; after a failed renewal retry sooner (1, 2, 4 s ...), within the lease.
        A failed call is no evidence the lock is lost: only another token in it, or our own clock
        passing the expiry without a renewal landing, is (`check()` fences the lapse)."""
        interval = self.ttl_s * HEARTBEAT_FRACTION
        wait, failures = interval, 0
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait, failures = interval, 0
            except Exception as e:  # noqa: BLE001 - a store hiccup
                failures += 1
                wait = min(interval, 2.0 ** (failures - 1))
                print(f"[cai] {self.store.uri_for(self.key)}: lock renewal failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                      f"retrying in {wait:.0f}s, {max(self.deadline - self.monotonic(), 0):.0f}s of the lease left", file=sys.stderr, flush=True)
            if self.lost.is_set():
                return

    def __enter__(self) -> "RunLock":
        self.store.check_conditional_writes()  # the lock is only as good as the store's create-only writes
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat:{self.key}", daemon=True)
        self._thread.start()
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        try:
            self.release()
        except CaiError:
            pass  # the store is unreachable: the lock lapses after its TTL, and the real error stays visible


def _sigterm_to_interrupt(signum, frame) -> None:
    """Kubernetes stops a pod with SIGTERM; as an interrupt it unwinds `with RunLock` (releasing the
    lock), the run is recorded as interrupted and a re-run resumes, as after Ctrl-C."""
    raise KeyboardInterrupt("SIGTERM")
