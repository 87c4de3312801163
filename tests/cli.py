"""main.py as a real subprocess for the tests: watch its output line by line and wait for events (a line, an
exit) with caps far above the quiet-machine time, so a loaded machine slows the tests down but never fails them."""
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Caps on waiting for one event. A tiny run takes seconds on a quiet machine; a 2-core machine running other
# work was seen 10x slower, so the caps are minutes (they only matter when something hangs).
CAP_S = 900


def env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def run_main_process(argv, cap_s: float = CAP_S, **kwargs) -> subprocess.CompletedProcess:
    """main.py to the end in a separate process: CompletedProcess with text stdout/stderr. For tests about the
    process itself (exit codes seen by a shell, environment variables, imports at start-up)."""
    return subprocess.run([sys.executable, "main.py", *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          timeout=cap_s, env=kwargs.pop("env", env()), **kwargs)


def run_main(argv, **extra_env) -> subprocess.CompletedProcess:
    """main.py to the end in this interpreter (``main.cli``), as a CompletedProcess: what a subprocess would show,
    without paying for a fresh interpreter and torch import per run. ``extra_env`` is set for the run only."""
    import main

    return run_in_process(main.cli, ["main.py", *map(str, argv)], extra_env)


def run_in_process(cli, argv: list, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``cli(argv[1:])`` with stdout/stderr captured and the exit code as a process would report it: the return
    value, a SystemExit's code, or 1 with the traceback on stderr for an uncaught exception. Warnings print to
    the captured stderr as in a fresh process (each once), and the environment, the working folder, the
    process-wide signal handlers and torch's thread count are restored afterwards."""
    import contextlib
    import io
    import signal
    import traceback
    import warnings

    import torch

    out, err = io.StringIO(), io.StringIO()
    saved_env, cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                                                        signal.SIGUSR2)}
    os.environ.update({k: str(v) for k, v in (extra_env or {}).items()})
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        # a fresh interpreter's filters (Python's defaults): otherwise a ResourceWarning for a file some earlier
        # test left to the garbage collector could print into this run's stderr
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        try:
            code = cli(list(argv[1:]))
        except SystemExit as exc:
            if isinstance(exc.code, str):
                err.write(exc.code + "\n")
                code = 1
            else:
                code = exc.code or 0
        except Exception:  # noqa: BLE001 (a process would die with the traceback on stderr and exit code 1)
            err.write(traceback.format_exc())
            code = 1
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            os.chdir(cwd)
            torch.set_num_threads(threads)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return subprocess.CompletedProcess(argv, code or 0, out.getvalue(), err.getvalue())


class Watched:
    """A started subprocess whose merged stdout/stderr is read by a thread, so waiting never blocks on a
    process that went quiet."""

    def __init__(self, cmd, **kwargs):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     **{"cwd": REPO, "env": env(), **kwargs})
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def main(cls, argv, **kwargs) -> "Watched":
        return cls([sys.executable, "main.py", *map(str, argv)], **kwargs)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        self._drain()
        return "".join(self.lines)

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    def wait_for(self, predicate, cap_s: float = CAP_S) -> str:
        """The first line (from the start of the output) for which ``predicate(line)`` holds; AssertionError
        with the output's tail if the process ends first or the cap passes."""
        for line in self.lines:
            if predicate(line):
                return line
        deadline = time.monotonic() + cap_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                break
            self.lines.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no such line (exit code {self.proc.poll()}):\n{''.join(self.lines)[-4000:]}")

    def finish(self, cap_s: float = CAP_S) -> int:
        """Wait for the exit; returns the exit code (the output is in ``output``)."""
        try:
            code = self.proc.wait(timeout=cap_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(timeout=60)
        self._drain()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_script(module: str, argv) -> subprocess.CompletedProcess:
    """One of the project's command-line scripts (``predict``, ``experiments.compare``, ...) run in this
    interpreter through its entry function (``cli`` or ``main``), as ``run_main`` does for main.py."""
    import importlib

    mod = importlib.import_module(module)
    entry = getattr(mod, "cli", None) or getattr(mod, "main")
    return run_in_process(entry, [module, *map(str, argv)])
