"""tests/cli.py's in-process runner shows what a fresh `python main.py` process would show: exit codes, warnings
once, and nothing that an earlier test left behind in this interpreter."""
import gc
import sys
import warnings

import pytest

from tests.cli import run_in_process


def _leaky_cli(argv):
    handle = open(__file__, "rb")  # left to the garbage collector: a ResourceWarning only Python's -X dev shows
    del handle
    gc.collect()
    warnings.warn("a warning of the run itself", UserWarning)
    print("out")
    return int(argv[0])


@pytest.mark.quick
def test_run_shows_its_own_warnings_but_not_resource_warnings_of_the_collector():
    result = run_in_process(_leaky_cli, ["prog", "3"])
    assert (result.returncode, result.stdout) == (3, "out\n")
    assert "UserWarning: a warning of the run itself" in result.stderr
    assert "ResourceWarning" not in result.stderr


def test_exit_codes_as_a_process_reports_them():
    def raises(argv):
        raise RuntimeError("boom")

    def exits(argv):
        sys.exit("a message")

    crashed, exited = run_in_process(raises, ["prog"]), run_in_process(exits, ["prog"])
    assert crashed.returncode == 1 and "RuntimeError: boom" in crashed.stderr and "Traceback" in crashed.stderr
    assert (exited.returncode, exited.stderr) == (1, "a message\n")
