"""A run is never lost, overwritten or mixed with another, through the real CLI: one live run per --output_dir,
a killed run resumes at once, finished runs are final (and extendable), --overwrite, leftovers of killed saves."""
import hashlib
import json
import os
import re
import shutil
import signal
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rundir.lease import LEASE_NAME
from rundir.preemption import REQUEUE_EXIT_CODE
from tests.cli import CAP_S, Watched, run_main
from tests.conftest import TINY_CLI


def snapshot(folder):
    """Every entry of the folder (hidden ones too) with its content hash and mtime, and the folder's mtime."""
    files = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
             for p in sorted(folder.iterdir())}
    return files, folder.stat().st_mtime_ns


def logged_epochs(folder):
    return [json.loads(line)["epoch"] for line in (folder / "log.txt").read_text().splitlines()]


def train_steps(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [e.step for e in acc.Scalars("train/loss")]


def copy_run(finished_tiny_run, tmp_path):
    folder, argv = finished_tiny_run
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    return copy, [str(copy) if a == str(folder) else a for a in argv]


BUSY = re.compile(r"error: --output_dir (?P<dir>\S+) is in use by another run \(host \S+, pid (?P<pid>\d+), "
                  r"since \S+; pid (?P=pid) is running on this host \(its heartbeat is \d+ s old\)\); wait for it "
                  r"to finish, stop it \(kill (?P=pid) on \S+\) or choose another --output_dir; a dead owner is taken "
                  r"over at once on its own host or by its requeued Slurm job, else after --owner_timeout 600 s "
                  r"without a heartbeat")


def test_second_run_on_a_live_folder_refuses_started_together_or_later(tmp_path, cli_synthetic_root):
    out = tmp_path / "run"
    # long enough that it is stopped by us (SIGUSR1), not by its end
    argv = [*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "100", "--log_every", "1",
            "--output_dir", out, "--resume", "auto"]
    first, second = Watched.main(argv), Watched.main(argv)
    try:
        loser = _first_to_exit(first, second)
        winner = second if loser is first else first
        assert loser.finish() == 2, loser.output
        assert BUSY.fullmatch(loser.output.splitlines()[-1]), loser.output
        assert f"pid {winner.pid}," in loser.output.splitlines()[-1]
        winner.wait_for(lambda line: line.startswith("Epoch: [0]"))
        later = run_main(argv)  # started while the winner trains
        assert later.returncode == 2 and BUSY.fullmatch(later.stderr.strip()), later.stderr
        assert later.stderr.count("\n") == 1 and f"pid {winner.pid}," in later.stderr
        winner.proc.send_signal(signal.SIGUSR1)
        assert winner.finish() == REQUEUE_EXIT_CODE, winner.output[-3000:]
    finally:
        first.kill()
        second.kill()
    # only the winner wrote: one events file, every step once, no lease left
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    steps = train_steps(out)
    assert steps == list(range(1, len(steps) + 1)) and steps
    assert not (out / LEASE_NAME).exists()
    epochs = logged_epochs(out) if (out / "log.txt").exists() else []
    assert epochs == list(range(len(epochs)))


def _first_to_exit(*procs):
    deadline = time.monotonic() + CAP_S
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.proc.poll() is not None:
                return proc
        time.sleep(0.1)
    raise AssertionError("neither run exited:\n" + "\n".join(p.output[-2000:] for p in procs))


def test_a_killed_run_resumes_at_once_and_its_leftovers_go(tmp_path, cli_synthetic_root):
    out = tmp_path / "run"
    argv = [*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "2", "--log_every", "1",
            "--output_dir", out, "--resume", "auto"]
    killed = Watched.main(argv)
    try:
        killed.wait_for(lambda line: line.startswith("Epoch: [1]"))  # epoch 0 is checkpointed
    finally:
        killed.kill()  # SIGKILL: no cleanup at all
    assert json.loads((out / LEASE_NAME).read_text())["pid"] == killed.pid
    # what a kill during a checkpoint save leaves (rundir.checkpoint.atomic_save's temporary name)
    leftover = out / f".checkpoint.pth.{killed.pid}.0123abcd.tmp"
    leftover.write_bytes(b"\0" * 2**20)
    # and what a kill between writing a lease record and linking it leaves (rundir.lease.acquire), long ago
    stale = out / f"{LEASE_NAME}.deadbeefdeadbeef.tmp"
    stale.write_text("{}")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))

    resumed = run_main(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = resumed.stdout.splitlines()
    taking = [line for line in lines if line.startswith("taking over")]
    assert len(taking) == 1 and re.fullmatch(
        rf"taking over {out} from host \S+, pid {killed.pid}, since \S+: pid {killed.pid} is gone from this host",
        taking[0]), taking
    assert (f"removed 2 temporary files (1.0 MiB) left by interrupted writes in {out}: {leftover.name}, "
            f"{stale.name}") in lines
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 1" in lines
    assert not leftover.exists() and not stale.exists() and not (out / LEASE_NAME).exists()
    assert logged_epochs(out) == [0, 1]
    assert train_steps(out) == [1, 2, 3, 4]


def test_rerunning_into_a_finished_folder_refuses_and_touches_nothing(finished_tiny_run):
    folder, argv = finished_tiny_run
    before = snapshot(folder)
    for extra in ([], ["--epochs", "3"]):
        result = run_main([*argv, *extra])
        assert result.returncode == 2
        assert result.stderr == (f"error: --output_dir {folder} already holds a run (checkpoint.pth, "
                                 f"{next(folder.glob('events.out.tfevents.*')).name}, finished.json, log.txt); pass "
                                 f"--resume auto to continue it, or --overwrite to delete its checkpoints, logs and "
                                 f"events and start over\n")
        assert snapshot(folder) == before


def test_resume_auto_on_a_finished_run_touches_nothing(finished_tiny_run):
    folder, argv = finished_tiny_run
    before = snapshot(folder)
    finished = (folder / "finished.json").read_bytes()
    result = run_main([*argv, "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == (
        f"already finished: {folder} finished 1 epoch (finished.json); nothing to do with --epochs 1 "
        f"(a larger --epochs with --resume auto extends it)")
    assert (folder / "finished.json").read_bytes() == finished
    assert snapshot(folder) == before  # not even a lease came and went


@pytest.mark.quick
def test_finished_json_keeps_the_metrics_of_the_checkpoint(finished_tiny_run, tmp_path):
    """A kill after the last checkpoint and before finished.json (here also tearing log.txt's last line):
    the resumed run trains nothing and evaluates nothing, and still writes the last evaluation's metrics."""
    folder, argv = copy_run(finished_tiny_run, tmp_path)
    finished = json.loads((folder / "finished.json").read_text())
    assert len(finished["metrics"]) == 12
    (folder / "finished.json").unlink()
    with open(folder / "log.txt", "a") as f:
        f.write('{"epoch": 1, "train_lo')
    result = run_main([*argv, "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"dropping 1 torn line(s) of {folder / 'log.txt'} (a write that did not finish)" in result.stdout
    assert "Test:" not in result.stdout and "Epoch: [" not in result.stdout
    assert json.loads((folder / "finished.json").read_text()) == finished
    assert logged_epochs(folder) == [0]


def test_a_finished_run_is_extended_with_more_epochs_and_overwritten_on_request(finished_tiny_run, tmp_path):
    folder, argv = copy_run(finished_tiny_run, tmp_path)
    result = run_main([*argv, "--resume", "auto", "--epochs", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"extending the finished run in {folder} from 1 to 2 epochs" in result.stdout
    assert logged_epochs(folder) == [0, 1] and train_steps(folder) == [1, 2, 3, 4]
    finished = json.loads((folder / "finished.json").read_text())
    assert finished["epochs"] == 2 and len(finished["metrics"]) == 12
    assert torch.load(folder / "checkpoint.pth", weights_only=True)["metrics"] == finished["metrics"]

    events = sorted(p.name for p in folder.glob("events.out.tfevents.*"))
    result = run_main([*argv, "--overwrite"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"--overwrite: removed the previous run's checkpoint.pth, config.json, {', '.join(events)}, "
            f"finished.json, log.txt from {folder}") in result.stdout
    assert logged_epochs(folder) == [0] and train_steps(folder) == [1, 2]
    assert json.loads((folder / "finished.json").read_text())["epochs"] == 1
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1


def test_overwrite_and_resume_exclude_each_other(tmp_path):
    result = run_main(["--output_dir", tmp_path, "--resume", "auto", "--overwrite", "--device", "cpu"])
    assert result.returncode == 2
    assert result.stderr == ("error: --overwrite starts over but --resume auto continues the run in --output_dir; "
                             "pass one of them (python main.py --help lists the flags)\n")


def test_resume_auto_refuses_a_run_whose_checkpoint_is_gone(finished_tiny_run, tmp_path):
    folder, argv = copy_run(finished_tiny_run, tmp_path)
    (folder / "checkpoint.pth").unlink()
    before = snapshot(folder)
    result = run_main([*argv, "--resume", "auto", "--epochs", "2"])
    assert result.returncode == 2
    assert result.stderr == (f"error: --output_dir {folder} holds a run that logged 1 epoch but has no checkpoint.pth "
                             f"to resume from; restore it (or --resume one of its checkpoint*.pth), or pass "
                             f"--overwrite instead of --resume auto to start over\n")
    assert snapshot(folder) == before
