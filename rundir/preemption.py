"""Stopping cleanly when Slurm preempts the job or its time limit approaches, and requeueing it.

Slurm sends SIGTERM on preemption / scancel / time limit (then SIGKILL after KillWait, ~30 s by default)
and, with ``#SBATCH --signal=USR1@<seconds>``, SIGUSR1 that long before the time limit; submitit and
``--signal=USR2@...`` use SIGUSR2. All of them reach every process of the step (the whole process group),
DataLoader workers included: ``SignalSafeLoader`` makes its workers ignore them, so only the main process acts.
Ctrl-C (SIGINT) takes the same path but exits with INTERRUPT_EXIT_CODE and no requeue; a second one exits at
once. The handler only
records the signal: the training loop checks ``requested`` at a safe point (after an optimizer step),
main saves the checkpoint and calls ``exit_for_requeue()``, and the requeued job resumes with
``--resume auto``.

Exit code REQUEUE_EXIT_CODE = 75 (EX_TEMPFAIL in sysexits.h, "temporary failure, retry later") means
"stopped early on a signal, checkpoint saved, resumable". It is distinct from 0 (done), 1 (crash),
2 (UserError) and 124 (what GNU ``timeout`` returns), so launch scripts can tell it apart.

Under submitit, detected by the SUBMITIT_EXECUTOR environment variable that submitit exports in its
sbatch script (and its local executor) and that every process of the job inherits, no scontrol is run:
submitit requeues the job itself from its own SIGUSR2 handler. The environment variable is used rather
than ``'submitit' in sys.modules`` because any process that merely imports submitit (a launcher,
a test) would otherwise look like a submitit job.
"""
import contextlib
import functools
import os
import signal
import subprocess
import sys
from typing import Callable, NoReturn, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

REQUEUE_EXIT_CODE = 75
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# what the training loop stops on: the launchers' signals, and Ctrl-C
STOP_SIGNALS = PREEMPTION_SIGNALS + (signal.SIGINT,)


class PreemptionHandler:
    """Records the ``signals`` (default SIGTERM / SIGUSR1 / SIGUSR2) instead of dying; install on every rank,
    from the main thread, before DataLoader workers start.

    Creating it installs the handlers; ``uninstall()`` (or leaving a ``with`` block) restores the
    previous ones. With SIGINT among the signals, a first Ctrl-C is recorded like the others
    (``interrupted``) and a second one exits at once with INTERRUPT_EXIT_CODE.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self._signal_name: str | None = None
        self._interrupts = 0
        self._previous = {sig: signal.signal(sig, self._record) for sig in signals}

    def _record(self, signum: int, frame) -> None:
        # Only set a flag: saving from inside a signal handler could interrupt a half-done optimizer
        # step or a collective, and the handler runs between arbitrary bytecodes of the main thread.
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # the user does not want to wait for the checkpoint
                print("interrupted again: exiting without saving", file=sys.stderr, flush=True)
                os._exit(INTERRUPT_EXIT_CODE)
        if self._signal_name is None:
            self._signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """True once one of the signals arrived in this process."""
        return self._signal_name is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received ('SIGTERM', 'SIGUSR1', ...), or None."""
        return self._signal_name

    @property
    def interrupted(self) -> bool:
        """True when the first signal was Ctrl-C (SIGINT): stop without requeueing."""
        return self._signal_name == signal.SIGINT.name

    def requested_on_any_rank(self, device: torch.device | str = 'cpu') -> bool:
        """``requested`` on any rank, identical on all ranks (an all-reduce when distributed).

        Slurm signals the ranks at slightly different moments; every rank must stop after the same
        step or the next collective hangs. All ranks must call this at the same points. ``device``
        must suit the backend (the rank's CUDA device for NCCL).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def uninstall(self) -> None:
        """Put back the handlers that were installed before this one."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> 'PreemptionHandler':
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def _ignore_stop_signals(worker_id: int, then: Optional[Callable[[int], None]] = None) -> None:
    """DataLoader ``worker_init_fn``: ignore STOP_SIGNALS, then let through what arrived while they were blocked
    (discarded, being ignored); then the loader's own ``worker_init_fn``."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if then is not None:
        then(worker_id)


class SignalSafeLoader(DataLoader):
    """A DataLoader whose worker processes ignore STOP_SIGNALS, so a signal sent to the whole process group
    stops the run through the main process's handler instead of killing a worker (which fails the main process
    with "DataLoader worker ... is killed by signal").

    Ignoring them in ``worker_init_fn`` alone leaves a window: between the fork and ``worker_init_fn`` a worker
    runs torch's worker set-up, which installs C handlers that die on SIGTERM, and before that it has the parent's
    handlers. So the signals are blocked in the forking thread while the workers start (``__iter__``; workers
    inherit the mask), the worker unblocks them once they are ignored, and the parent once the workers exist:
    a signal arriving meanwhile is delivered to the parent then. Torch's own worker seeding is unchanged.
    """

    def __init__(self, *args, worker_init_fn: Optional[Callable[[int], None]] = None, **kwargs):
        super().__init__(*args, worker_init_fn=functools.partial(_ignore_stop_signals, then=worker_init_fn),
                         **kwargs)

    def __iter__(self):
        with _blocked(STOP_SIGNALS):
            return super().__iter__()


@contextlib.contextmanager
def _blocked(signals):
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def exit_for_requeue(rank: int | None = None) -> NoReturn:
    """Requeue the Slurm job (rank 0, outside submitit) and exit with REQUEUE_EXIT_CODE.

    Call after the checkpoint is saved (and, when distributed, after a barrier): ``scontrol requeue``
    ends the running job's processes. Array tasks are requeued as <SLURM_ARRAY_JOB_ID>_<TASK_ID>.
    The job must be requeueable (``#SBATCH --requeue``); a failed requeue is logged, the exit code
    stays the same because the checkpoint is saved either way. ``rank`` defaults to the process
    group's rank, else $RANK or $SLURM_PROCID.
    """
    if rank is None:
        rank = _rank()
    job_id = os.environ.get('SLURM_JOB_ID')
    if job_id and not os.environ.get('SUBMITIT_EXECUTOR') and rank == 0:
        array_job, array_task = os.environ.get('SLURM_ARRAY_JOB_ID'), os.environ.get('SLURM_ARRAY_TASK_ID')
        target = f'{array_job}_{array_task}' if array_job and array_task else job_id
        _log(f'requeueing Slurm job {target}: scontrol requeue {target}')
        try:
            result = subprocess.run(['scontrol', 'requeue', target], capture_output=True, text=True,
                                    timeout=60)
            if result.returncode != 0:
                _log(f'scontrol requeue {target} failed (exit {result.returncode}): '
                     f'{result.stderr.strip()}; resubmit with --resume auto')
        except (OSError, subprocess.TimeoutExpired) as e:
            _log(f'scontrol requeue {target} failed ({e}); resubmit with --resume auto')
    _log(f'exiting with code {REQUEUE_EXIT_CODE} (stopped for requeue, checkpoint saved)')
    sys.exit(REQUEUE_EXIT_CODE)


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')))


def _log(message: str) -> None:
    print(f'preemption: {message}', file=sys.stderr, flush=True)
