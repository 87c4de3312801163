"""Launchers against a real one-node Slurm cluster (tests/slurm_cluster.py): sbatch sweep arrays, srun and
torchrun world sizes, submitit submission and requeue, run ownership. slurm/sweep.py and the sweep-file reader:
tests/test_slurm_sweep.py."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import sweeps
from tests.cli import Watched
from tests.slurm_cluster import _free_port, slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# a cap on one job, far above its quiet-machine time (seconds to a minute): only a hang reaches it
WAIT_S = 900
TINY_FLAGS = ["--dataset_file", "synthetic", "--synthetic_train_size", "8", "--synthetic_val_size", "4",
              "--synthetic_image_size", "64", "--backbone", "resnet18", "--backbone_weights", "none",
              "--hidden_dim", "32", "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1", "--nheads",
              "2", "--num_queries", "10", "--batch_size", "2", "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """Every job's synthetic set goes here (never into the default cache under ~)."""
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def tiny_flags(synthetic_root):
    return TINY_FLAGS + ["--synthetic_root", synthetic_root]


@pytest.fixture(scope="module")
def one_epoch_flags(tiny_flags):
    return tiny_flags + ["--epochs", "1", "--max_iters_per_epoch", "2"]

# CPU-node overrides of the 4-GPU #SBATCH header of slurm/*.sbatch
CPU_NODE = ["--partition=debug", "--gres=none", "--ntasks-per-node=1", "--cpus-per-task=1"]


def logged_epochs(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "log.txt").read_text().splitlines()]


def run_files(run_dir):
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------ sbatch sweep array

def test_sweep_array_trains_every_run_and_resubmission_skips_finished(slurm_cluster, tmp_path, synthetic_root):
    root, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    smoke = REPO / "experiments" / "synthetic_smoke.sweep"
    names = [run.name for run in sweeps.read_sweep(smoke, check=False)]
    assert len(names) == 2
    submit = ["--array=0-1", *CPU_NODE, f"--output={logs}/slurm-%A_%a.out",
              "slurm/sweep.sbatch", str(smoke), str(root), "--synthetic_root", synthetic_root]

    job = slurm_cluster.sbatch(submit, cwd=REPO, env={"PYTHON": PY})
    jobs = slurm_cluster.wait_job(job, WAIT_S)
    outputs = [(logs / f"slurm-{job}_{i}.out").read_text() for i in range(2)]
    assert [j["JobState"] for j in jobs] == ["COMPLETED"] * 2, outputs
    for i, name in enumerate(names):
        run_dir = root / name
        assert f"run {name}: main.py" in outputs[i]
        assert {"checkpoint.pth", "log.txt", "finished.json", "config.json"} <= set(run_files(run_dir))
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
        assert logged_epochs(run_dir) == [0]
        assert json.loads((run_dir / "finished.json").read_text())["epochs"] == 1
    before = {name: run_files(root / name) for name in names}

    again = slurm_cluster.sbatch(submit, cwd=REPO, env={"PYTHON": PY})
    jobs = slurm_cluster.wait_job(again, WAIT_S)
    assert [j["JobState"] for j in jobs] == ["COMPLETED"] * 2
    for i, name in enumerate(names):
        text = (logs / f"slurm-{again}_{i}.out").read_text()
        assert text.strip() == f"skip (finished): {name}: {root}/{name} finished 1 epoch (finished.json)"
        assert run_files(root / name) == before[name]  # same files, same mtimes


# ------------------------------------------------------------------------------ srun / torchrun

def test_srun_two_tasks_train_with_world_size_two(slurm_cluster, tmp_path, one_epoch_flags):
    out = tmp_path / "run"
    proc = slurm_cluster.run(["srun", "-n", "2", "--kill-on-bad-exit=1", PY, "main.py", *one_epoch_flags,
                              "--output_dir", str(out)], cwd=REPO, timeout=WAIT_S)
    text = proc.stdout + proc.stderr
    # each rank announces itself once before print() is silenced; afterwards only rank 0 prints
    assert "| distributed init (rank 0/2, local 0, gloo): tcp://" in text
    assert "| distributed init (rank 1/2, local 1, gloo): tcp://" in text
    assert text.count("world size: 2 (rank 0)") == 1 and "world size: 1" not in text
    assert text.count("start training") == 1
    assert logged_epochs(out) == [0]
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert (out / "finished.json").exists()


def test_torchrun_inside_single_srun_task_gets_torchruns_world_size(slurm_cluster, tmp_path, one_epoch_flags):
    out = tmp_path / "run"
    port = str(_free_port())
    proc = slurm_cluster.run(["srun", "-n", "1", "-c", "2", PY, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={port}", "main.py", *one_epoch_flags, "--output_dir", str(out)],
                             cwd=REPO, timeout=WAIT_S)
    text = proc.stdout + proc.stderr
    assert "| distributed init (rank 0/2, local 0, gloo): env://" in text
    assert "| distributed init (rank 1/2, local 1, gloo): env://" in text
    assert text.count("world size: 2 (rank 0)") == 1 and "world size: 1" not in text
    assert logged_epochs(out) == [0]


# ------------------------------------------------------------------------------ submitit

def _submit(slurm_cluster, flags):
    proc = slurm_cluster.run([PY, "slurm/submit.py", *flags], cwd=REPO, timeout=WAIT_S)
    job_id = re.search(r"^submitted job (\d+):", proc.stdout, re.M).group(1)
    stdout = Path(re.search(r"^stdout: (\S+)$", proc.stdout, re.M).group(1))
    return job_id, stdout


def test_submitit_two_tasks_per_node_on_gpu_partition(slurm_cluster, tmp_path, one_epoch_flags):
    # gpu4's node advertises gpu:4 without devices: 2 "GPUs" -> 2 tasks, trained on CPU with gloo
    out = tmp_path / "run"
    job_id, stdout = _submit(slurm_cluster, ["--partition", "gpu4", "--ngpus", "2", "--cpus_per_task", "1",
                                             "--timeout", "10", *one_epoch_flags, "--output_dir", str(out)])
    job = slurm_cluster.wait_job(job_id, WAIT_S)[0]
    text = stdout.read_text()
    assert job["JobState"] == "COMPLETED", text
    assert job["NumTasks"] == "2" and job["TresPerNode"].endswith("gpu:2"), job
    assert text.count("world size: 2 (rank 0)") == 1
    assert (out / "finished.json").exists() and logged_epochs(out) == [0]
    assert stdout.parent == out / "submitit"


def _wait_for_epochs(slurm_cluster, job_id, run_dir, n):
    """Poll until log.txt has n epochs (the job must still be running meanwhile)."""
    log, deadline = run_dir / "log.txt", time.time() + WAIT_S
    while not (log.exists() and log.read_text().count("\n") >= n):
        info = slurm_cluster.job_info(job_id)[0]
        if info["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING") or time.time() > deadline:
            slurm_cluster.run(["scancel", job_id], check=False)
            pytest.fail(f"job {job_id} is {info['JobState']} before epoch {n - 1} was logged")
        time.sleep(0.2)
    return logged_epochs(run_dir)


def test_submitit_job_preempted_mid_run_is_requeued_and_resumes(slurm_cluster, tmp_path, tiny_flags):
    out = tmp_path / "run"
    flags = ["--partition", "debug", "--ngpus", "0", "--cpus_per_task", "1", "--timeout", "10",
             *tiny_flags, "--epochs", "3", "--max_iters_per_epoch", "4", "--log_every", "1", "--output_dir", str(out)]
    job_id, stdout = _submit(slurm_cluster, flags)
    assert _wait_for_epochs(slurm_cluster, job_id, out, 1) == [0]
    # submitit's preemption signal: its handler calls Trainer.checkpoint() and `scontrol requeue`s the job
    slurm_cluster.run(["scancel", "--signal=USR2", job_id])

    job = slurm_cluster.wait_job(job_id, WAIT_S)[0]
    text = stdout.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text
    # (with a 10-minute limit submitit counts any stop as a timeout: it requeues either way)
    # Restarts == 1 above is the requeue; submitit's "Requeued job" line is not required: Slurm may end the job's
    # processes, `scontrol requeue` itself included, before that line is written (seen on a loaded machine)
    assert "Caught signal SIGUSR2" in text
    assert logged_epochs(out) == [0, 1, 2]  # every epoch logged exactly once
    assert (out / "finished.json").exists()
    assert text.count("world size: 1 (rank 0)") == 2  # started twice
    # the requeued job continues after the last saved epoch (0), not from scratch
    assert re.findall(r"resumed from (\S+) at epoch (\d+)", text) == [(str(out / "checkpoint.pth"), "1")]
    assert text.count("Epoch: [0] [0/4]") == 1  # epoch 0 was not trained again


def test_train_sbatch_usr1_checkpoints_requeues_and_resumes_mid_epoch(slurm_cluster, tmp_path, tiny_flags):
    out, log = tmp_path / "run", tmp_path / "train.out"
    job_id = slurm_cluster.sbatch([*CPU_NODE, f"--output={log}", "slurm/train.sbatch", *tiny_flags, "--epochs", "2",
                                   "--max_iters_per_epoch", "4", "--log_every", "1", "--output_dir", str(out)],
                                  cwd=REPO, env={"PYTHON": PY})
    assert _wait_for_epochs(slurm_cluster, job_id, out, 1) == [0]
    # what #SBATCH --signal=USR1@120 sends before the time limit: main saves, requeues, exits 75
    slurm_cluster.run(["scancel", "--signal=USR1", job_id])

    job = slurm_cluster.wait_job(job_id, WAIT_S)[0]
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text
    assert f"scontrol requeue {job_id}" in text and "exiting with code 75" in text
    saved = re.findall(r"SIGUSR1: saved checkpoint at epoch 1, iteration (\d+)", text)
    resumed = re.findall(r"resumed from \S+ at epoch 1, iteration (\d+)", text)
    assert len(saved) == 1 and resumed == saved, text
    assert logged_epochs(out) == [0, 1] and (out / "finished.json").exists()
    assert f"job {job_id} (restart 1)" in text


# ------------------------------------------------------------------------------ run ownership under Slurm

HOLD_LEASE = """
import sys
from rundir import lease
held = lease.acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
held.release()
"""


def _hold_lease(folder):
    """A live process on this host owning ``folder`` until its stdin is closed."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = Watched([PY, "-c", HOLD_LEASE, str(folder)], stdin=subprocess.PIPE)
    holder.wait_for(lambda line: line.startswith("held"))
    return holder


def _train_steps(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars("train/loss")]


def test_sweep_array_resubmitted_while_running_skips_the_live_run(slurm_cluster, tmp_path, synthetic_root):
    root, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    smoke = REPO / "experiments" / "synthetic_smoke.sweep"
    name = sweeps.read_sweep(smoke, check=False)[0].name
    run_dir = root / name
    submit = ["--array=0", *CPU_NODE, f"--output={logs}/slurm-%A_%a.out", "slurm/sweep.sbatch", str(smoke),
              str(root), "--synthetic_root", synthetic_root, "--epochs", "3", "--max_iters_per_epoch", "4",
              "--log_every", "1"]
    first = slurm_cluster.sbatch(submit, cwd=REPO, env={"PYTHON": PY})
    assert _wait_for_epochs(slurm_cluster, first, run_dir, 1) == [0]
    # freeze the training processes: the run is live for as long as the resubmitted array needs
    slurm_cluster.run(["scancel", "--signal=STOP", first])
    try:
        owner = json.loads((run_dir / ".owner.json").read_text())
        assert owner["job"] == f"{first}_0"
        again = slurm_cluster.sbatch(submit, cwd=REPO, env={"PYTHON": PY})
        assert [j["JobState"] for j in slurm_cluster.wait_job(again, WAIT_S)] == ["COMPLETED"]
    finally:
        slurm_cluster.run(["scancel", "--signal=CONT", first])
    # the last line: a one-task array of a two-run sweep also warns that the array is short (on stderr, same file)
    text = (logs / f"slurm-{again}_0.out").read_text().strip().splitlines()[-1]
    pid = owner["pid"]
    assert re.fullmatch(rf"skip \(live\): {name}: {run_dir} is in use by another run \(host \S+, pid {pid}, Slurm job "
                        rf"{first}_0, since \S+; pid {pid} is running on this host \(its heartbeat is \d+ s old\)\)",
                        text), text
    jobs = slurm_cluster.wait_job(first, WAIT_S)
    assert [j["JobState"] for j in jobs] == ["COMPLETED"], (logs / f"slurm-{first}_0.out").read_text()
    # the first array trained alone: every epoch logged once, every step once, none lost
    assert logged_epochs(run_dir) == [0, 1, 2]
    assert _train_steps(run_dir) == list(range(1, 13))
    assert json.loads((run_dir / "finished.json").read_text())["epochs"] == 3


def test_train_sbatch_skips_a_finished_run_and_a_live_one(slurm_cluster, tmp_path, tiny_flags):
    finished, live, log = tmp_path / "finished", tmp_path / "live", tmp_path / "train-%j.out"
    finished.mkdir()
    (finished / "finished.json").write_text('{"epochs": 2, "metrics": {}}')
    holder = _hold_lease(live)
    try:
        jobs = {out: slurm_cluster.sbatch([*CPU_NODE, f"--output={log}", "slurm/train.sbatch", *tiny_flags, "--epochs",
                                           "2", "--output_dir", str(out)], cwd=REPO, env={"PYTHON": PY})
                for out in (finished, live)}
        for job in jobs.values():
            assert slurm_cluster.wait_job(job, WAIT_S)[0]["JobState"] == "COMPLETED"
    finally:
        holder.proc.stdin.close()
        holder.finish()
    text = (tmp_path / f"train-{jobs[finished]}.out").read_text()
    assert text == f"skip (finished): {finished} finished 2 epochs (finished.json)\n"
    text = (tmp_path / f"train-{jobs[live]}.out").read_text()
    assert re.fullmatch(rf"skip \(live\): {live} is in use by another run \(host \S+, pid {holder.pid}, since \S+; "
                        rf"pid {holder.pid} is running on this host \(its heartbeat is \d+ s old\)\)\n", text), text
    assert sorted(p.name for p in finished.iterdir()) == ["finished.json"]


def test_every_rank_of_a_refused_run_exits_2_before_writing(slurm_cluster, tmp_path, one_epoch_flags):
    out = tmp_path / "run"
    holder = _hold_lease(out)
    try:
        # no --kill-on-bad-exit: each rank must stop by itself (rank 0 decides, the decision is broadcast)
        proc = slurm_cluster.run(["srun", "-n", "2", PY, "main.py", *one_epoch_flags, "--output_dir", str(out)],
                                 cwd=REPO, check=False, timeout=WAIT_S)
        assert sorted(p.name for p in out.iterdir()) == [".owner.json"]  # the holder's, nothing else
    finally:
        holder.proc.stdin.close()
        holder.finish()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --output_dir {out} is in use by another run (host ")
    assert f"pid {holder.pid}," in errors[0]
    # srun reports the two tasks on one line ("tasks 0-1") or on two, depending on when each exited
    assert re.search(r"srun: error: \S+: tasks 0-1: Exited with exit code 2", proc.stderr) or all(
        re.search(rf"srun: error: \S+: task {t}: Exited with exit code 2", proc.stderr) for t in (0, 1)), proc.stderr


def test_owner_on_another_host_is_judged_by_its_slurm_job(slurm_cluster, tmp_path):
    """From another host only Slurm (or the heartbeat timeout) can tell: a job that ended frees the folder."""
    ended = slurm_cluster.sbatch([*CPU_NODE, "--wrap", "true", f"--output={tmp_path}/true.out"])
    assert slurm_cluster.wait_job(ended, WAIT_S)[0]["JobState"] == "COMPLETED"
    running = slurm_cluster.sbatch([*CPU_NODE, "--wrap", "sleep 600", f"--output={tmp_path}/sleep.out"])
    slurm_cluster.wait_state(running, {"RUNNING"}, WAIT_S)
    try:
        # a running job's owner counts as live until its heartbeat times out (the process may still run)
        for job, code, said in ((ended, 0, f"is dead: its Slurm job {ended} is COMPLETED)"),
                                (running, 4, f"Slurm job {running}, since 2030-01-01T00:00:00+00:00; its heartbeat is ")):
            folder = tmp_path / f"run-{job}"
            folder.mkdir()
            (folder / ".owner.json").write_text(json.dumps({
                "host": "othernode", "pid": 4242, "boot_id": "x", "pid_ns": "y", "slurm_job_id": job, "job": job,
                "restart": 0, "cluster": "smcatest", "since": "2030-01-01T00:00:00+00:00", "token": f"t{job}"}))
            proc = slurm_cluster.run([PY, "-m", "slurm.status", str(folder)], cwd=REPO, check=False,
                                     timeout=WAIT_S)
            assert proc.returncode == code and said in proc.stdout, proc.stdout + proc.stderr
    finally:
        slurm_cluster.run(["scancel", running], check=False)


@pytest.mark.quick
def test_submit_py_does_not_resubmit_a_finished_run(tmp_path, tiny_flags):
    out = tmp_path / "run"
    out.mkdir()
    (out / "finished.json").write_text('{"epochs": 1, "metrics": {}}')
    proc = subprocess.run([PY, "slurm/submit.py", "--ngpus", "0", *tiny_flags, "--epochs", "1", "--output_dir",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"skip (finished): {out} finished 1 epoch (finished.json)\n"
    assert sorted(p.name for p in out.iterdir()) == ["finished.json"]  # no submitit folder: nothing submitted
