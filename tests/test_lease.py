"""The run-folder lease (rundir/lease.py) on real files with real processes: who wins, when a dead owner is taken
over, the heartbeat, and the launchers' status CLI (slurm/status.py)."""
import errno
import json
import os
import subprocess
import sys
import time

import pytest

from tests.cli import CAP_S, REPO, Watched, env
from rundir import lease as leases
from rundir import run_folder

PY = sys.executable

HOLD = """
import sys
from rundir import lease
held = lease.acquire(sys.argv[1], timeout_s=float(sys.argv[2]), heartbeat_s=float(sys.argv[3]))
print("held", held.owner.token, flush=True)
sys.stdin.read()  # hold until the test closes stdin
held.release()
print("released", flush=True)
"""

# every racer waits for the go file, then tries once; the winner holds until its stdin closes
RACE = """
import os, sys, time
from rundir import lease
folder, go = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
try:
    held = lease.acquire(folder, timeout_s=600)
except lease.LeaseBusy as busy:
    print("busy", busy.reason, flush=True)
    sys.exit(0)
print("won", held.owner.token, flush=True)
sys.stdin.read()
held.release()
"""


def _holder(folder, timeout_s=600, heartbeat_s=30):
    proc = Watched([PY, "-c", HOLD, str(folder), str(timeout_s), str(heartbeat_s)], stdin=subprocess.PIPE)
    proc.wait_for(lambda line: line.startswith("held"))
    return proc


def _fake_lease(folder, age_s=0.0, **fields):
    """A lease as another process on another machine would have written it, heartbeat ``age_s`` old."""
    owner = {**leases._DEFAULTS, "host": "elsewhere", "pid": 4242, "since": "2030-01-01T00:00:00+00:00",
             "token": "feedfacefeedface", **fields}
    path = folder / leases.LEASE_NAME
    path.write_text(json.dumps(owner))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


@pytest.fixture
def no_slurm(monkeypatch):
    """No scontrol on PATH and no Slurm job around us: only the host and heartbeat rules apply."""
    monkeypatch.setenv("PATH", os.path.dirname(PY))
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)


@pytest.mark.quick
def test_a_free_folder_is_taken_and_released(tmp_path):
    held = leases.acquire(tmp_path)
    owner = json.loads((tmp_path / leases.LEASE_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["token"] == held.owner.token
    assert sorted(p.name for p in tmp_path.iterdir()) == [leases.LEASE_NAME]  # no temporary file left
    held.release()
    assert list(tmp_path.iterdir()) == []


def test_live_owner_on_this_host_refuses_and_a_killed_one_is_taken_over_at_once(tmp_path, no_slurm):
    owner = _holder(tmp_path)
    try:
        with pytest.raises(leases.LeaseBusy) as busy:
            leases.acquire(tmp_path)
        assert busy.value.holder.owner.pid == owner.pid
        assert busy.value.reason.startswith(f"pid {owner.pid} is running on this host")
    finally:
        owner.kill()  # SIGKILL: the lease stays behind
    assert json.loads((tmp_path / leases.LEASE_NAME).read_text())["pid"] == owner.pid
    said = []
    held = leases.acquire(tmp_path, log=said.append)
    assert said == [f"taking over {tmp_path} from {busy.value.holder.owner.describe()}: "
                    f"pid {owner.pid} is gone from this host"]
    held.release()


def test_a_reused_pid_is_not_the_owner(tmp_path, no_slurm):
    me = leases.Owner.me()
    # our own (living) pid, but started at another time: the owner died and the pid was given to us
    _fake_lease(tmp_path, host=me.host, boot_id=me.boot_id, pid_ns=me.pid_ns, pid=os.getpid(),
                pid_start=me.pid_start - 100.0)
    said = []
    leases.acquire(tmp_path, log=said.append).release()
    assert said and said[0].endswith(f"pid {os.getpid()} is gone from this host (the pid now belongs to another "
                                     f"process)")


def test_other_host_is_live_until_its_heartbeat_times_out(tmp_path, no_slurm):
    _fake_lease(tmp_path, age_s=5)
    with pytest.raises(leases.LeaseBusy) as busy:
        leases.acquire(tmp_path, timeout_s=600)
    assert busy.value.reason == "its heartbeat is 5 s old"
    _fake_lease(tmp_path, age_s=700)
    said = []
    leases.acquire(tmp_path, timeout_s=600, log=said.append).release()
    assert said == [f"taking over {tmp_path} from host elsewhere, pid 4242, since 2030-01-01T00:00:00+00:00: "
                    f"its heartbeat is 700 s old (timeout 600 s)"]


@pytest.mark.quick
def test_a_requeued_slurm_job_takes_over_its_previous_run(tmp_path, no_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "c1")
    _fake_lease(tmp_path, slurm_job_id="77", job="77", cluster="c1", restart=0)
    with pytest.raises(leases.LeaseBusy):  # the same job, not requeued: two starts inside one allocation
        leases.acquire(tmp_path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    said = []
    leases.acquire(tmp_path, log=said.append).release()
    assert said[0].endswith("it is this Slurm job before its requeue (restart 0, now 1)")


@pytest.mark.parametrize("stale", [False, True], ids=["free-folder", "dead-owner"])
def test_racing_processes_have_exactly_one_winner(tmp_path, no_slurm, stale):
    folder, go = tmp_path / "run", tmp_path / "go"
    folder.mkdir()
    if stale:
        _fake_lease(folder, age_s=10_000)
    racers = [Watched([PY, "-c", RACE, str(folder), str(go)], stdin=subprocess.PIPE) for _ in range(4)]
    try:
        for racer in racers:  # all started (imports done) before the go
            racer.wait_for(lambda line: line.startswith("ready"))
        go.write_text("go")
        results = [racer.wait_for(lambda line: line.startswith(("won", "busy"))) for racer in racers]
        winners = [r for r in results if r.startswith("won")]
        assert len(winners) == 1, results
        token = winners[0].split()[1]
        assert json.loads((folder / leases.LEASE_NAME).read_text())["token"] == token
        assert all(r.startswith("busy pid ") and "is running on this host" in r for r in results if r not in winners)
    finally:
        for racer in racers:
            racer.proc.stdin.close()
            racer.finish()
    assert list(folder.iterdir()) == []  # released; no temporary or break file left


def test_heartbeat_refreshes_the_lease_and_notices_a_takeover(tmp_path):
    held = leases.acquire(tmp_path, heartbeat_s=0.1)
    try:
        path = tmp_path / leases.LEASE_NAME
        os.utime(path, (time.time() - 1000, time.time() - 1000))
        deadline = time.monotonic() + CAP_S
        while leases.read_holder(tmp_path).age_s > 500 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leases.read_holder(tmp_path).age_s < 500
        _fake_lease(tmp_path)  # another process judged us dead and took the folder
        while held.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.lost == (f"the lease {path} now names host elsewhere, pid 4242, "
                             f"since 2030-01-01T00:00:00+00:00")
    finally:
        held.release()
    assert (tmp_path / leases.LEASE_NAME).exists()  # release leaves the new owner's lease alone


def _status(*args):
    return subprocess.run([PY, "-m", "slurm.status", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=CAP_S, env=env())


def test_status_cli_says_new_finished_live_and_dead(tmp_path):
    folder = tmp_path / "run"
    result = _status(folder)
    assert (result.returncode, result.stdout) == (0, f"{folder} is free (no run yet)\n")
    folder.mkdir()
    (folder / "log.txt").write_text('{"epoch": 0}\n')
    (folder / run_folder.FINISHED).write_text(json.dumps({"epochs": 2, "metrics": {}}))
    result = _status(folder, "--epochs", "2")
    assert (result.returncode, result.stdout) == (3, f"{folder} finished 2 epochs (finished.json)\n")
    result = _status(folder, "--epochs", "5")
    assert (result.returncode, result.stdout) == (0, f"{folder} is free (finished 2 epochs; --epochs 5 extends it)\n")
    (folder / run_folder.FINISHED).unlink()

    owner = _holder(folder)
    try:
        result = _status(folder)
        assert result.returncode == 4
        assert result.stdout.startswith(f"{folder} is in use by another run (host ")
        assert f"pid {owner.pid} is running on this host" in result.stdout
    finally:
        owner.kill()
    result = _status("--", "--output_dir", folder, "--epochs", "3")  # main.py's flags, as the sbatch scripts pass
    assert result.returncode == 0
    assert result.stdout.startswith(f"{folder} is free (holds log.txt; --resume auto continues it; its last owner (")
    assert result.stdout.endswith(f"is dead: pid {owner.pid} is gone from this host)\n")
    assert _status().returncode == 2


def test_a_lease_file_removed_by_hand_is_put_back(tmp_path):
    held = leases.acquire(tmp_path, heartbeat_s=0.1)
    try:
        (tmp_path / leases.LEASE_NAME).unlink()
        deadline = time.monotonic() + CAP_S
        while leases.read_holder(tmp_path) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leases.read_holder(tmp_path).owner.token == held.owner.token and held.lost is None
    finally:
        held.release()
    assert list(tmp_path.iterdir()) == []


def test_a_filesystem_without_hard_links_still_gets_one_owner(tmp_path, monkeypatch, no_slurm):
    # Emulated (no such filesystem here): CIFS and some FUSE mounts refuse link() with EPERM.
    def refuse_link(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(leases.os, "link", refuse_link)
    held = leases.acquire(tmp_path)
    try:
        assert leases.read_holder(tmp_path).owner.token == held.owner.token
        with pytest.raises(leases.LeaseBusy) as busy:
            leases.acquire(tmp_path)
        assert busy.value.reason.startswith(f"pid {os.getpid()} is running on this host")
    finally:
        held.release()
    assert list(tmp_path.iterdir()) == []
