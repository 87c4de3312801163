"""A real one-node Slurm cluster on this machine, for the launcher tests.

`SlurmCluster` writes slurm.conf / gres.conf / cgroup.conf into a private
directory, starts its own `munged` (own key and socket, so a system munge,
if any, is left alone), `slurmctld -D` and `slurmd -D`, and waits until
`sinfo` shows the node idle. Every daemon is a child started here and is
stopped by pid. Debian's `slurm-wlm` and `munge` are installed with apt-get
when missing and we are root.

The node advertises `gpu:4` with no device files: the scheduler can then
place `--gres=gpu:N` jobs on the `gpu4` partition, but nothing is bound, so
such jobs must still run with `--device cpu`.

pytest: the session fixture `slurm_cluster` (registered in tests/conftest.py
or imported by the test module). Where the cluster cannot start (not root,
no apt-get) the tests skip with the reason; under CI=true they fail instead.

Debugging by hand: `scripts/start_slurm.sh` (= `python tests/slurm_cluster.py
start DIR`) starts the same cluster and prints the SLURM_CONF to export.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "scancel", "squeue")
START_TIMEOUT_S = 120
# Job states after which a job does nothing more (scontrol's JobState=...).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class ClusterUnavailable(Exception):
    """The cluster cannot be started here (the reason is the message)."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed():
    """Install slurm-wlm + munge with apt-get when a binary is missing."""
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm binaries missing ({', '.join(missing)}) and not root to apt-get them")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"Slurm binaries missing ({', '.join(missing)}) and no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]
    if missing:
        raise ClusterUnavailable(f"still missing after apt-get: {', '.join(missing)}")


def _hardware_line(node):
    """`slurmd -C`'s NodeName line (CPUs, sockets, cores, memory), so the config
    never claims more than the machine has (slurmd would drain the node)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("NodeName="))
    return re.sub(r"^NodeName=\S+", f"NodeName={node}", line)


class SlurmCluster:
    """One-node cluster: partitions `debug` (default) and `gpu4`, node with gpu:4 gres."""

    partitions = ("debug", "gpu4")

    def __init__(self, root):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.procs = {}

    @property
    def env(self):
        """Environment for any Slurm client or job: our SLURM_CONF."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # ---------------------------------------------------------------- setup
    def write_config(self):
        etc, state, spool, log, run = (self.root / d for d in ("etc", "state", "spool", "log", "run"))
        for d in (etc, state, spool, log, run):
            d.mkdir(parents=True, exist_ok=True)
        self.munge_socket = run / "munge.socket"
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        lines = [
            "ClusterName=smcatest",
            # The host name must be ours (slurmctld checks it); the address is loopback.
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Own munge socket; cred_expire is also how long a requeued job waits
            # before it may start again (default 120 s, too slow for tests).
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={run}/slurmctld.pid",
            f"SlurmdPidFile={run}/slurmd.pid",
            f"SlurmctldLogFile={log}/slurmctld.log",
            f"SlurmdLogFile={log}/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in containers: track processes by parent pid, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # Schedule pending (and requeued) jobs within seconds, not a minute.
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "ReturnToService=2",
            "JobRequeue=1",
            # Finished jobs stay visible to `scontrol show job` this long (polling).
            "MinJobAge=900",
            "KillWait=30",
            "InactiveLimit=0",
            "GresTypes=gpu",
            f"{_hardware_line(self.node)} NodeAddr=127.0.0.1 Gres=gpu:4 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            f"PartitionName=gpu4 Nodes={self.node} Default=NO MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        # slurmd counts a gpu gres only through device files; empty placeholder files
        # are enough: with task/none nothing is bound, and jobs see no real GPU.
        dev = self.root / "dev"
        dev.mkdir(exist_ok=True)
        for i in range(4):
            (dev / f"gpu{i}").touch()
        (etc / "gres.conf").write_text(f"AutoDetect=off\nNodeName={self.node} Name=gpu File={dev}/gpu[0-3]\n")
        (etc / "cgroup.conf").write_text("CgroupAutomount=no\n")

    def _spawn(self, name, cmd):
        logf = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()

    def _start_munge(self):
        key = self.root / "etc" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        run = self.root / "run"
        # --force: we are root and the socket's parents (/tmp) are world-writable.
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={run}/munged.pid", f"--log-file={self.root}/log/munged.log",
                               f"--seed-file={run}/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), "munged socket", "munged")

    def start(self):
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root (SlurmdUser=root) and we are not root")
        self.write_config()
        self._start_munge()
        # -c: start from a clean state (no jobs from an earlier run of this dir).
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, "node idle in sinfo", "slurmctld", "slurmd")
        return self

    def _wait(self, ready, what, *daemons, timeout=START_TIMEOUT_S):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for d in daemons:
                if self.procs[d].poll() is not None:
                    raise RuntimeError(f"{d} exited with {self.procs[d].returncode} while waiting for {what}:\n"
                                       + self.logs())
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n" + self.logs())

    def _node_idle(self):
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        return proc.returncode == 0 and any(l.split() == [self.node, "idle"] for l in proc.stdout.splitlines())

    def logs(self, tail=3000):
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self):
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ------------------------------------------------------------- helpers
    def run(self, cmd, check=True, timeout=120, **kw):
        """Run a client command with our SLURM_CONF; returns CompletedProcess (text)."""
        env = dict(self.env, **kw.pop("env", {}))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sbatch(self, args, cwd=None, env=None):
        """Submit with `sbatch --parsable`; returns the job id (the array's master id for arrays)."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or {}).stdout.strip()
        return out.split(";")[0]

    def job_info(self, job_id):
        """`scontrol show job` as a list of {key: value}, one per job (array tasks are separate)."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        jobs = []
        for line in proc.stdout.splitlines():
            fields = dict(m.groups() for m in re.finditer(r"(\w+(?::\w+)?)=(\S*)", line))
            if fields:
                jobs.append(fields)
        return jobs

    def wait_job(self, job_id, timeout=300):
        """Wait until every job/array task of `job_id` reached a final state; returns the states."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.job_info(job_id)
            states = [j["JobState"] for j in jobs]
            if jobs and all(s in FINAL_STATES for s in states):
                return jobs
            time.sleep(1)
        self.run(["scancel", str(job_id)], check=False)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s (cancelled): {self.job_info(job_id)}")

    def wait_state(self, job_id, states, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.job_info(job_id)
            if jobs and jobs[0]["JobState"] in states:
                return jobs[0]
            time.sleep(0.5)
        self.run(["scancel", str(job_id)], check=False)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s (cancelled): {self.job_info(job_id)}")

    def cancel_all(self):
        self.run(["scancel", "--full", "--user", str(os.getuid())], check=False)


@pytest.fixture(scope="session")
def slurm_cluster():
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # short path: unix socket names are limited
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        cluster.stop()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Slurm cluster unavailable under CI=true: {exc}")
        pytest.skip(f"Slurm cluster unavailable: {exc}")
    except Exception:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _main(argv):
    if len(argv) != 2 or argv[0] != "start":
        sys.exit("usage: python tests/slurm_cluster.py start DIR   (runs until Ctrl-C)")
    cluster = SlurmCluster(Path(argv[1]).resolve())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so a kill while starting cleans up
    try:
        cluster.start()
    except BaseException as exc:
        cluster.stop()
        sys.exit(f"error: {exc}")
    # Blocked only now: children inherit the signal mask, and daemons must stay killable.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    print(f"export SLURM_CONF={cluster.conf}\nlogs: {cluster.root}/log   (Ctrl-C stops the cluster)", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.cancel_all()
        cluster.stop()


if __name__ == "__main__":
    _main(sys.argv[1:])
