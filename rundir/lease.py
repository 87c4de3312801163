"""One live owner per run folder: a lease file with a heartbeat, safe on shared filesystems.

A run's rank 0 holds ``<folder>/.owner.json`` while it may write into the folder. The file says who
owns it (host, pid and the pid's start time, the Slurm job and its restart count, since when, a random
token); its modification time is the heartbeat, refreshed every ``HEARTBEAT_S`` seconds by a daemon
thread, which also notices when the lease stopped being ours.

Why not ``flock``: on NFS and Lustre a lock may be local to one node (or not supported), and a lock dies
with the process, so it cannot say who held it. The lease only needs operations that are atomic on
those filesystems too:

- taking a free lease: write the owner record to a private temporary file, fsync, and ``link()`` it to
  ``.owner.json``; a hard link fails if the name exists, so one process wins. (An NFS client may report
  a link that succeeded as failed when the reply is lost; the link count of the temporary file tells.)
  The winner re-reads the file and compares the token.
- taking over a dead owner's lease (token T): create ``.owner.json.break-T`` with O_CREAT|O_EXCL (atomic
  on NFSv3+ and Lustre). Only its creator may remove the lease holding token T, and only after re-reading
  that the lease still holds T; then it links its own lease like a free one. Tokens are random and never
  reused, so a lease cannot be removed by someone who judged an older owner. A breaker that dies leaves
  its break file: it is ignored once older than ``BREAK_STALE_S``.
- a filesystem without hard links: the lease is created with O_CREAT|O_EXCL instead; a reader that sees
  it half-written finds an unreadable lease with a fresh heartbeat, which counts as live.
- a lease file removed by hand while its owner runs is linked back by the owner's next heartbeat.

Whether an owner is dead (``judge``), in this order:
1. same host (host name, boot and pid namespace): its pid is gone, or now belongs to a younger
   process -> dead; alive -> live, whatever its heartbeat (a hung process could still wake up and write);
2. the same Slurm job id as ours with a lower restart count: the owner was this job before a requeue;
3. its Slurm job (same cluster; asked with ``scontrol show job``) is no longer running -> dead;
4. its heartbeat is older than the timeout -> dead (node crash, lost network, no Slurm).
Otherwise it is live. The timeout should cover long stalls (NFS attribute caching, a long save);
clocks of the nodes are assumed to agree to well within it (NTP).
"""
import datetime
import errno
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import psutil

LEASE_NAME = ".owner.json"
HEARTBEAT_S = 30.0
DEFAULT_TIMEOUT_S = 600.0
BREAK_STALE_S = 60.0
_ATTEMPTS = 20  # rounds of "someone else moved first" before giving up on acquiring
# Slurm job states in which the job's processes may still run (anything else: they are gone).
_SLURM_ALIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                "RESIZING"}


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _start_time(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


@dataclass(frozen=True)
class Owner:
    """Who holds (or wants) a lease. ``job`` is what scancel takes (``<array>_<task>`` for array tasks)."""
    host: str
    pid: int
    pid_start: Optional[float]
    boot_id: str
    pid_ns: str
    slurm_job_id: str
    job: str
    restart: int
    cluster: str
    since: str
    token: str

    @classmethod
    def me(cls) -> "Owner":
        env = os.environ
        job_id = env.get("SLURM_JOB_ID", "")
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_start=_start_time(os.getpid()),
                   boot_id=_read_text("/proc/sys/kernel/random/boot_id") or "", pid_ns=_pid_namespace(),
                   slurm_job_id=job_id, job=f"{array}_{task}" if job_id and array and task else job_id,
                   restart=int(env.get("SLURM_RESTART_COUNT", 0) or 0), cluster=env.get("SLURM_CLUSTER_NAME", ""),
                   since=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   token=secrets.token_hex(8))

    @classmethod
    def from_json(cls, text: str) -> "Owner":
        data = json.loads(text)
        return cls(**{name: data.get(name, default) for name, default in _DEFAULTS.items()})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    def same_machine(self, other: "Owner") -> bool:
        """True when pids of the two can be compared: same host name, boot and pid namespace."""
        return (self.host == other.host and self.boot_id == other.boot_id and self.pid_ns == other.pid_ns)

    def describe(self) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.since}"


_DEFAULTS = dict(host="?", pid=0, pid_start=None, boot_id="", pid_ns="", slurm_job_id="", job="", restart=0,
                 cluster="", since="?", token="")


@dataclass(frozen=True)
class Holder:
    """The lease as found on disk: its owner (None if unreadable) and the heartbeat's age in seconds."""
    owner: Optional[Owner]
    age_s: float


class LeaseBusy(Exception):
    """The folder has a live owner; ``holder`` says who, ``reason`` why it counts as live."""

    def __init__(self, folder: Path, holder: Holder, reason: str):
        super().__init__(reason)
        self.folder, self.holder, self.reason = folder, holder, reason


def read_holder(folder) -> Optional[Holder]:
    """The current lease of ``folder``, or None when there is none."""
    path = Path(folder) / LEASE_NAME
    try:
        with open(path) as f:
            text = f.read()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    try:
        owner = Owner.from_json(text)
    except (ValueError, TypeError):
        owner = None  # not written by this module (the lease is only ever linked in complete)
    return Holder(owner, max(0.0, time.time() - mtime))


def judge(holder: Holder, me: Owner, timeout_s: float, job_state=None) -> tuple[bool, str]:
    """(owner is dead, why) for a lease found on disk, from the point of view of ``me`` (module docstring).

    ``job_state(owner)`` returns the Slurm state of the owner's job or None if unknown (default: asks
    scontrol when the owner ran on this cluster).
    """
    owner = holder.owner
    stale = holder.age_s > timeout_s
    heartbeat = f"its heartbeat is {holder.age_s:.0f} s old"
    if owner is None:
        return (True, f"the lease file is unreadable and {heartbeat}") if stale else (
            False, f"the lease file is unreadable and {heartbeat}")
    if owner.same_machine(me):
        start = _start_time(owner.pid)
        if start is None:
            return True, f"pid {owner.pid} is gone from this host"
        if owner.pid_start is not None and abs(start - owner.pid_start) > 1.0:
            return True, f"pid {owner.pid} is gone from this host (the pid now belongs to another process)"
        return False, f"pid {owner.pid} is running on this host ({heartbeat})"
    if owner.slurm_job_id and owner.slurm_job_id == me.slurm_job_id and owner.cluster == me.cluster \
            and owner.restart < me.restart:
        return True, f"it is this Slurm job before its requeue (restart {owner.restart}, now {me.restart})"
    state = (job_state or slurm_job_state)(owner) if owner.slurm_job_id else None
    if state is not None and state not in _SLURM_ALIVE:
        return True, f"its Slurm job {owner.job} is {state}"
    if stale:
        return True, f"{heartbeat} (timeout {timeout_s:g} s)"
    return False, heartbeat


def slurm_job_state(owner: Owner) -> Optional[str]:
    """The owner's Slurm job state ('RUNNING', ...; 'GONE' when Slurm no longer knows it), or None when
    it cannot be asked: no scontrol here, another cluster, or the controller did not answer."""
    if not shutil.which("scontrol") or owner.cluster != _cluster_name():
        return None
    try:
        proc = subprocess.run(["scontrol", "-o", "show", "job", owner.slurm_job_id], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return "GONE" if "invalid job id" in proc.stderr.lower() else None
    # an array task's record can list several jobs; the owner's is the one with its JobId
    for line in proc.stdout.splitlines():
        if re.search(rf"\bJobId={re.escape(owner.slurm_job_id)}\b", line):
            state = re.search(r"\bJobState=(\w+)", line)
            return state.group(1) if state else None
    return None


_CLUSTER = []


def _cluster_name() -> str:
    """This machine's Slurm cluster: $SLURM_CLUSTER_NAME inside a job, else scontrol's ClusterName."""
    if os.environ.get("SLURM_CLUSTER_NAME"):
        return os.environ["SLURM_CLUSTER_NAME"]
    if not _CLUSTER:
        name = ""
        try:
            out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
            match = re.search(r"^ClusterName\s*=\s*(\S+)", out, re.M)
            name = match.group(1) if match else ""
        except (OSError, subprocess.SubprocessError):
            pass
        _CLUSTER.append(name)
    return _CLUSTER[0]


class Lease:
    """A held lease: a heartbeat thread keeps it fresh; ``lost`` says why it is no longer ours."""

    def __init__(self, folder: Path, owner: Owner, heartbeat_s: float):
        self.folder, self.owner = folder, owner
        self.path = folder / LEASE_NAME
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="lease-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            holder = read_holder(self.folder)
            if holder is None and self._relink():
                continue  # someone removed the file by hand; nobody else took the folder
            if holder is None or holder.owner is None or holder.owner.token != self.owner.token:
                holder = holder or read_holder(self.folder)
                taker = holder.owner.describe() if holder and holder.owner else "an unreadable owner record"
                self.lost = f"the lease {self.path} now names {taker}"
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a hiccup of the filesystem: the next beat tries again; the timeout is generous

    def _relink(self) -> bool:
        tmp = self.folder / f"{LEASE_NAME}.{self.owner.token}.tmp"
        try:
            _write_synced(tmp, self.owner.to_json())
            return _link(tmp, self.path, self.owner.to_json())
        except OSError:
            return False
        finally:
            _unlink_quietly(tmp)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        self._thread.join()
        holder = read_holder(self.folder)
        if holder is not None and holder.owner is not None and holder.owner.token == self.owner.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def acquire(folder, timeout_s: float = DEFAULT_TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S,
            log=print) -> Lease:
    """Take the lease of ``folder`` (which must exist), taking over a dead owner's; LeaseBusy if live.

    OSError when the folder is not writable.
    """
    folder = Path(folder)
    me = Owner.me()
    path, tmp = folder / LEASE_NAME, folder / f"{LEASE_NAME}.{me.token}.tmp"
    _write_synced(tmp, me.to_json())
    try:
        for _ in range(_ATTEMPTS):
            if _link(tmp, path, me.to_json()):
                holder = read_holder(folder)
                if holder is not None and holder.owner is not None and holder.owner.token == me.token:
                    return Lease(folder, me, heartbeat_s)
                continue
            holder = read_holder(folder)
            if holder is None:
                continue  # released between our link and our read: try again
            dead, reason = judge(holder, me, timeout_s)
            if not dead:
                raise LeaseBusy(folder, holder, reason)
            if _break(folder, holder, me):
                who = holder.owner.describe() if holder.owner else "an unknown owner"
                log(f"taking over {folder} from {who}: {reason}")
            else:
                time.sleep(0.2 + secrets.randbelow(300) / 1000)  # another process is breaking it
        holder = read_holder(folder) or Holder(None, 0.0)
        raise LeaseBusy(folder, holder, "other processes kept taking the lease first")
    finally:
        _unlink_quietly(tmp)


def leftover_files(folder) -> list[str]:
    """Names of temporary and break files of acquisitions that were killed midway (older than BREAK_STALE_S,
    so no live acquisition still uses them)."""
    folder, found = Path(folder), []
    for path in folder.glob(f"{LEASE_NAME}.*"):
        try:
            if time.time() - path.stat().st_mtime > BREAK_STALE_S:
                found.append(path.name)
        except FileNotFoundError:
            pass
    return sorted(found)


def _write_synced(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _link(tmp: Path, path: Path, text: str) -> bool:
    """Put the complete file ``tmp`` (holding ``text``) at ``path`` unless ``path`` exists; True if done."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        # NFS: a retransmitted link whose first reply was lost fails with EEXIST although it worked
        return os.stat(tmp).st_nlink == 2
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
    # a filesystem without hard links: exclusive create; a reader may briefly see a partial record, which
    # counts as an unreadable lease with a fresh heartbeat, i.e. live
    try:
        _write_synced(path, text)
        return True
    except FileExistsError:
        return False


_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def _break(folder: Path, holder: Holder, me: Owner) -> bool:
    """Remove the dead lease ``holder`` if we win the right to; False when another process is doing it."""
    token = holder.owner.token if holder.owner else "unreadable"
    brk = folder / f"{LEASE_NAME}.break-{token}"
    try:
        _write_synced(brk, me.to_json())
    except FileExistsError:
        try:
            if time.time() - os.stat(brk).st_mtime > BREAK_STALE_S:
                _unlink_quietly(brk)  # its creator died while breaking
        except FileNotFoundError:
            pass
        return False
    try:
        current = read_holder(folder)
        same = current is not None and (current.owner.token if current.owner else "unreadable") == token
        if same:
            _unlink_quietly(folder / LEASE_NAME)
        return same
    finally:
        _unlink_quietly(brk)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
