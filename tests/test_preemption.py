"""Preemption (rundir/preemption.py): the signal handler and the requeue exit."""
import os
import pathlib
import shlex
import signal
import subprocess
import sys

import pytest

from rundir.preemption import REQUEUE_EXIT_CODE, PreemptionHandler, exit_for_requeue

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Preemption


def test_preemption_handler_sets_flag_and_uninstall_restores():
    def previous(signum, frame):
        raise AssertionError('the preemption handler should have caught this signal')

    old = signal.signal(signal.SIGUSR1, previous)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        handler = PreemptionHandler()
        assert not handler.requested and handler.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.requested and handler.signal_name == 'SIGUSR1'
        assert handler.requested_on_any_rank() is True
        handler.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is old_term
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_exit_for_requeue_outside_slurm_exits_with_documented_code(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'SUBMITIT_'))}
    env['PYTHONPATH'] = str(REPO)
    code = 'from rundir.preemption import exit_for_requeue; exit_for_requeue(); print("not reached")'
    result = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == REQUEUE_EXIT_CODE == 75
    assert 'not reached' not in result.stdout


@pytest.mark.parametrize('env_extra,expected_call', [
    ({'SLURM_JOB_ID': '123'}, 'requeue 123'),
    ({'SLURM_JOB_ID': '123', 'SLURM_ARRAY_JOB_ID': '100', 'SLURM_ARRAY_TASK_ID': '4'}, 'requeue 100_4'),
    ({'SLURM_JOB_ID': '123', 'SUBMITIT_EXECUTOR': 'slurm'}, None),
    ({'SLURM_JOB_ID': '123', 'SLURM_PROCID': '1'}, None),
])
@pytest.mark.quick
def test_exit_for_requeue_under_slurm(tmp_path, monkeypatch, env_extra, expected_call):
    record = tmp_path / 'scontrol_args'
    scontrol = tmp_path / 'scontrol'
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {shlex.quote(str(record))}\n')
    scontrol.chmod(0o755)
    for name in list(os.environ):
        if name.startswith(('SLURM_', 'SUBMITIT_')) or name == 'RANK':
            monkeypatch.delenv(name)
    monkeypatch.setenv('PATH', f'{tmp_path}{os.pathsep}{os.environ["PATH"]}')
    for name, value in env_extra.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        exit_for_requeue()
    assert info.value.code == REQUEUE_EXIT_CODE
    assert (record.read_text().strip() if record.exists() else None) == expected_call
