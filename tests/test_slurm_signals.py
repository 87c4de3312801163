"""Slurm's own signal delivery against a run with DataLoader workers: `scancel --signal` reaches every process of
the job step (workers included), as the time limit's SIGTERM and `#SBATCH --signal` do."""
import re
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 900  # a cap far above the quiet-machine time of the job
CPU_NODE = ["--partition=debug", "--gres=none", "--ntasks-per-node=1", "--cpus-per-task=2"]
STEPS = 20
FLAGS = ["--dataset_file", "synthetic", "--synthetic_train_size", str(2 * STEPS), "--synthetic_val_size", "4",
         "--synthetic_image_size", "64", "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
         "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1", "--nheads", "2", "--num_queries", "10",
         "--batch_size", "2", "--num_workers", "2", "--device", "cpu", "--epochs", "1", "--log_every", "1",
         "--eval_every", "100"]


def _wait_for_line(cluster, job_id, log, pattern):
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        if log.exists() and re.search(pattern, log.read_text(), re.M):
            return
        info = cluster.job_info(job_id)
        if info and info[0]["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job_id} is {info[0]['JobState']} before {pattern!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} after {WAIT_S}s")


def test_scancel_usr2_with_workers_saves_mid_epoch_requeues_and_resumes(slurm_cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.out"
    job_id = slurm_cluster.sbatch([*CPU_NODE, f"--output={log}", "slurm/train.sbatch", *FLAGS,
                                   "--synthetic_root", str(tmp_path / "synthetic"), "--output_dir", str(out)],
                                  cwd=REPO, env={"PYTHON": sys.executable})
    _wait_for_line(slurm_cluster, job_id, log, rf"^Epoch: \[0\] \[ 3/{STEPS}\]")
    # to every process of the job's steps: main.py and its two DataLoader workers
    slurm_cluster.run(["scancel", "--signal=USR2", job_id])

    job = slurm_cluster.wait_job(job_id, WAIT_S)[0]
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text
    assert "DataLoader worker" not in text
    assert f"scontrol requeue {job_id}" in text and "exiting with code 75" in text
    saved = re.findall(r"SIGUSR2: saved checkpoint at epoch 0, iteration (\d+)", text)
    resumed = re.findall(r"resumed from \S+ at epoch 0, iteration (\d+)", text)
    assert len(saved) == 1 and resumed == saved and 4 <= int(saved[0]) < STEPS, text
    assert (out / "finished.json").exists()


@pytest.mark.quick
def test_sbatch_scripts_ask_for_a_signal_the_run_stops_on():
    """`#SBATCH --signal=SIG@T` in both sbatch scripts names a signal main.py saves and requeues on."""
    import signal

    from rundir.preemption import PREEMPTION_SIGNALS

    for script in ("train.sbatch", "sweep.sbatch"):
        (name,) = re.findall(r"^#SBATCH --signal=(?:B:)?(\w+)@\d+$", (REPO / "slurm" / script).read_text(), re.M)
        assert getattr(signal, f"SIG{name}") in PREEMPTION_SIGNALS, script
