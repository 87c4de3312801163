"""Signals as clusters send them: to the whole process group of a run with DataLoader workers (Slurm's time
limit and scancel, `timeout`, submitit's and --signal's USR signals, Ctrl-C in a terminal). The workers ignore
them; the main process stops through the preemption path (rundir/preemption.py)."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from tests.cli import CAP_S, REPO, Watched, run_main
from tests.conftest import TINY_CLI
from rundir.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE

STEPS = 20  # iterations of the epoch: --synthetic_train_size 40 / --batch_size 2


def flags(root, out):
    argv = [*TINY_CLI, "--synthetic_root", root, "--synthetic_train_size", str(2 * STEPS), "--epochs", "1",
            "--max_iters_per_epoch", "0", "--log_every", "1", "--output_dir", str(out), "--resume", "auto"]
    argv[argv.index("--num_workers") + 1] = "2"
    return argv


def stop_group_mid_epoch(argv, sig):
    """Start main.py in its own session (its own process group, as a Slurm step or a terminal job), wait for a
    logged step, signal the whole group; (exit code, output)."""
    proc = Watched.main(argv, start_new_session=True)
    try:
        proc.wait_for(lambda line: line.startswith(f"Epoch: [0] [ 3/{STEPS}]"))
        os.killpg(proc.pid, sig)
        code = proc.finish()
    finally:
        proc.kill()
    return code, proc.output


def assert_resumes_mid_epoch(argv, out):
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 0 and 4 <= state["iteration"] < STEPS, state["iteration"]
    assert not (out / "finished.json").exists()
    resumed = run_main(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 0, iteration {state['iteration']}" in resumed.stdout
    assert f"Epoch: [0] [{state['iteration']:2d}/{STEPS}]" in resumed.stdout
    assert (out / "finished.json").exists()


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.quick), signal.SIGUSR1,
                                 signal.SIGUSR2], ids=lambda sig: sig.name)
def test_group_signal_with_workers_saves_mid_epoch_and_exits_75(tmp_path, cli_synthetic_root, sig):
    out = tmp_path / "run"
    argv = flags(cli_synthetic_root, out)
    code, output = stop_group_mid_epoch(argv, sig)
    assert code == REQUEUE_EXIT_CODE, output[-3000:]
    assert f"{sig.name}: saved checkpoint at epoch 0, iteration" in output
    assert "DataLoader worker" not in output and "Traceback" not in output
    assert_resumes_mid_epoch(argv, out)


INTERRUPTED = re.compile(r"^interrupted at epoch 0, iteration (\d+); checkpoint saved; continue with --resume auto$",
                         re.M)


def test_ctrl_c_saves_mid_epoch_prints_one_line_and_exits_130(tmp_path, cli_synthetic_root):
    out = tmp_path / "run"
    argv = flags(cli_synthetic_root, out)
    code, output = stop_group_mid_epoch(argv, signal.SIGINT)  # a terminal's Ctrl-C: the foreground group
    assert code == INTERRUPT_EXIT_CODE, output[-3000:]
    lines = [line for line in output.splitlines() if "interrupt" in line.lower()]
    assert len(lines) == 1 and INTERRUPTED.match(lines[0]), output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert int(INTERRUPTED.search(output).group(1)) == torch.load(out / "checkpoint.pth")["iteration"]
    assert_resumes_mid_epoch(argv, out)


SECOND_CTRL_C = """
import os, signal
from rundir.preemption import STOP_SIGNALS, PreemptionHandler
handler = PreemptionHandler(STOP_SIGNALS)
os.kill(os.getpid(), signal.SIGINT)
assert handler.interrupted, "first Ctrl-C recorded"
print("first recorded", flush=True)
os.kill(os.getpid(), signal.SIGINT)
print("still running after the second Ctrl-C", flush=True)
"""


@pytest.mark.quick
def test_second_ctrl_c_exits_at_once():
    result = subprocess.run([sys.executable, "-c", SECOND_CTRL_C], cwd=REPO, capture_output=True, text=True,
                            timeout=CAP_S)
    assert result.returncode == INTERRUPT_EXIT_CODE, result.stderr
    assert result.stdout == "first recorded\n"
    assert result.stderr == "interrupted again: exiting without saving\n"


def test_ctrl_c_before_training_is_one_line_not_a_traceback(monkeypatch, capsys):
    import main

    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "main", interrupted)
    assert main.cli(["--device", "cpu"]) == INTERRUPT_EXIT_CODE
    assert capsys.readouterr().err == "interrupted before training started; nothing saved\n"
