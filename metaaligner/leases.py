"""A run's lease on an output folder: one run writes an output at a time, and a dead run's lease runs out.

A run claims the output by writing `<output>/_staging/_leases/<run id>.json` (job, run id, host, process, start
time), then lists every claim there. It holds the lease when no other claim is live; otherwise it withdraws its
claim and refuses to start, naming the holder. Each claim is written before its owner lists, so two runs never
both find themselves alone (two runs that claim in the same instant both withdraw and retry after a random pause).

The holder renews its claim (a heartbeat) every `timeout / 6`. Another run's claim is stale, and is taken over with
a log line that names it, when
- it was not renewed for `timeout` seconds, measured on the storage's own clock (the claim's modification time
  against that of the claim just written, so the hosts' clocks never matter), or
- its process is gone: the same host, boot and PID namespace, and that PID no longer runs (or is a newer process),
  or it is this process and the run no longer holds a lease.
A holder whose claim was removed (taken over while its heartbeats were stopped) learns it at its next heartbeat
and at commit, which then fails without touching the output.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref

import pyarrow.fs as pafs

from metaaligner import storage as st
from metaaligner.storage import Storage

log = logging.getLogger(__name__)

LEASES = "_leases"  # inside the output's `_staging/`
_ATTEMPTS = 4  # claims in the same instant: withdraw, pause, claim again
_LIVE: set[str] = set()  # run ids holding a lease in this process


class LeaseError(RuntimeError):
    """The output is held by another live run, or this run lost its lease."""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The start time of a process (Linux, clock ticks since boot), "" when it does not run or is unknown."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[19] if stat else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _gone(claim: dict) -> str | None:
    """Why the claim's process surely no longer runs, or None when it may."""
    if claim.get("pid") == os.getpid() and claim.get("pid_start") == _start_ticks(os.getpid()):
        return None if claim.get("run_id") in _LIVE else "this process no longer holds that run's lease"
    same_machine = (claim.get("host") == socket.gethostname() and claim.get("boot_id")
                    and claim.get("boot_id") == _read("/proc/sys/kernel/random/boot_id")
                    and claim.get("pid_ns") and claim.get("pid_ns") == _pid_namespace())
    if same_machine and _start_ticks(int(claim.get("pid", 0))) != claim.get("pid_start"):
        return f"its process {claim.get('pid')} on this host has exited"
    return None


def describe(claim: dict) -> str:
    return (f"{claim.get('job', '?')} run {claim.get('run_id', '?')} on host {claim.get('host', '?')} "
            f"(pid {claim.get('pid', '?')}), started {claim.get('started_at', '?')}")


class Lease:
    """One run's claim on an output folder (see the module docstring)."""

    def __init__(self, output_uri: str, job: str, run_id: str, storage: Storage, timeout_s: float):
        self.output_uri, self.job, self.run_id, self.storage = output_uri, job, run_id, storage
        self.timeout_s = timeout_s
        self.folder = st.join(output_uri, "_staging", LEASES)
        self.uri = st.join(self.folder, f"{run_id}.json")
        pid = os.getpid()
        self.claim = {"run_id": run_id, "job": job, "host": socket.gethostname(), "pid": pid,
                      "pid_start": _start_ticks(pid), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
                      "pid_ns": _pid_namespace(), "started_at": _now(), "heartbeat_at": _now(), "state": "claiming"}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: list[str] = []

    # -- storage --------------------------------------------------------------------------------------------------
    def _put(self) -> None:
        data = json.dumps(self.claim, sort_keys=True).encode("utf-8")
        if st.is_s3(self.uri):
            bucket, key = st.split_s3(self.uri)
            self.storage.client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        fs, path = self.storage.filesystem(self.uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _delete(self) -> None:
        fs, path = self.storage.filesystem(self.uri)
        try:
            fs.delete_file(path)
        except (FileNotFoundError, OSError) as e:
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                log.warning("could not remove the lease %s: %s", self.uri, e)

    def claims(self) -> tuple[dict[str, dict], float | None]:
        """{run id: claim with its `mtime`} of every claim, and the mtime of ours (None when it is gone)."""
        fs, folder = self.storage.filesystem(self.folder)
        found: dict[str, dict] = {}
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.type != pafs.FileType.File or not info.path.endswith(".json"):
                continue
            run_id = info.path.rpartition("/")[2][:-len(".json")]
            try:
                with fs.open_input_stream(info.path) as f:
                    claim = json.loads(f.read())
            except (OSError, ValueError):  # removed meanwhile, or not a claim: judged by its age alone
                claim = {}
            claim = claim if isinstance(claim, dict) else {}
            found[run_id] = {**claim, "run_id": run_id, "mtime": info.mtime.timestamp() if info.mtime else 0.0}
        own = found.pop(self.run_id, None)
        return found, own["mtime"] if own else None

    def _stale(self, claim: dict, now: float) -> str | None:
        """Why another run's claim is stale, or None when it is live."""
        age = now - claim["mtime"]
        if age > self.timeout_s:
            return f"no heartbeat for {age:.0f} s (storage.output_lease_timeout_s: {self.timeout_s:.0f} s)"
        return _gone(claim)

    def _live_and_stale(self) -> tuple[list[dict], list[tuple[dict, str]], float | None]:
        others, now = self.claims()
        live, stale = [], []
        for claim in others.values():
            why = self._stale(claim, now if now is not None else time.time())
            if why:
                stale.append((claim, why))
            else:
                live.append({**claim, "age_s": max(0.0, (now or time.time()) - claim["mtime"])})
        return live, stale, now

    # -- the protocol ---------------------------------------------------------------------------------------------
    def acquire(self) -> list[tuple[dict, str]]:
        """Claim the output; returns the stale claims taken over (claim, why). Raises LeaseError naming the holder."""
        for attempt in range(_ATTEMPTS):
            self._put()
            live, stale, _ = self._live_and_stale()
            if not live:
                break
            self._delete()
            held = [c for c in live if c.get("state") == "held"]
            if held or attempt == _ATTEMPTS - 1:
                holder = min(held or live, key=lambda c: c.get("started_at", ""))
                raise LeaseError(
                    f"{self.output_uri} is being written by {describe(holder)}, last heartbeat {holder['age_s']:.0f} s "
                    f"ago; this {self.job} run {self.run_id} did not start. Wait for that run to end or write to "
                    f"another output. A run whose heartbeat stops for {self.timeout_s:.0f} s "
                    f"(storage.output_lease_timeout_s) is taken over by the next run.")
            time.sleep(random.uniform(0.05, 0.5) * (attempt + 1))
        self.claim["state"] = "held"
        self._put()
        _LIVE.add(self.run_id)
        for claim, why in stale:
            log.warning("taking over %s from %s: %s", self.output_uri, describe(claim), why)
            fs, path = self.storage.filesystem(st.join(self.folder, f"{claim['run_id']}.json"))
            try:
                fs.delete_file(path)
            except OSError:
                pass  # another run removed it first
        self._thread = threading.Thread(target=_heartbeats, args=(weakref.ref(self), self._stop, self.timeout_s / 6),
                                        name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        weakref.finalize(self, _release, self._stop, self.run_id, self.storage, self.uri)
        return stale

    def beat(self) -> None:
        """Renew the claim; a claim that is gone was taken over: remember it and renew no more."""
        if self._stop.is_set():
            return
        fs, path = self.storage.filesystem(self.uri)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            self._lost.append("its lease was taken over by another run (no heartbeat got through for "
                              f"{self.timeout_s:.0f} s)")
            self._stop.set()
            return
        self.claim["heartbeat_at"] = _now()
        self._put()

    def check(self) -> None:
        """Raise LeaseError unless this run still holds the lease (before it touches the committed output)."""
        live, _, own = self._live_and_stale()
        if self._lost or own is None:
            raise LeaseError(f"{self.job} run {self.run_id} lost its lease on {self.output_uri}: "
                             f"{(self._lost or ['its claim is gone'])[0]}")
        if live:
            raise LeaseError(f"{self.job} run {self.run_id} lost its lease on {self.output_uri}: "
                             f"{describe(live[0])} holds it now")

    def live_runs(self) -> set[str]:
        """Run ids whose claims are live (this run's included)."""
        live, _, _ = self._live_and_stale()
        return {c["run_id"] for c in live} | {self.run_id}

    def release(self) -> None:
        """Stop the heartbeats, wait for one in flight (it would write the claim again), remove the claim."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        _release(self._stop, self.run_id, self.storage, self.uri)


def _heartbeats(lease_ref, stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        lease = lease_ref()
        if lease is None:
            return
        try:
            lease.beat()
        except Exception as e:  # noqa: BLE001 — a storage hiccup: the next beat tries again
            log.warning("lease heartbeat of run %s failed: %s", lease.run_id, e)
        del lease


def _release(stop: threading.Event, run_id: str, storage: Storage, uri: str) -> None:
    """Stop the heartbeats and remove the claim (also when the run's objects are collected without a release)."""
    if stop.is_set() and run_id not in _LIVE:
        return
    stop.set()
    _LIVE.discard(run_id)
    try:
        fs, path = storage.filesystem(uri)
        fs.delete_file(path)
        if not st.is_s3(uri):
            os.rmdir(os.path.dirname(path))  # only when no other claim is there
    except Exception:  # noqa: BLE001 — gone already, other claims, or storage down: a claim runs out by itself
        pass
