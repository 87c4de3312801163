"""Shared test setup: the repo root on sys.path (imports are top-level packages), a private home folder, and tiny
model configurations."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


_HOME = []


def pytest_configure(config):
    # tests/test_slurm.py and tests/test_slurm_sweep.py mark their modules; registered here so `-m "not slurm"`
    # works without a warning
    config.addinivalue_line("markers", "slurm: needs a local Slurm cluster (tests/slurm_cluster.py)")
    # `bash scripts/test.sh --quick` runs the tests marked quick: a few fast ones per module, for before a commit
    config.addinivalue_line("markers", "quick: part of the quick tier (scripts/test.sh --quick)")
    # Tests write only under temporary folders. Each test passes its own (--synthetic_root, --output_dir under
    # tmp_path); as a guarantee, whatever still falls back to the home folder (the synthetic set's default
    # cache, torch.hub, matplotlib's cache), here or in a subprocess or Slurm job, lands in a private home
    # removed at the end.
    home = tempfile.mkdtemp(prefix="smca-test-home-")
    _HOME.append(home)
    os.environ["HOME"] = home
    for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TORCH_HOME", "MPLCONFIGDIR"):
        os.environ.pop(name, None)


    # One intra-op thread per test process: the suite runs one process per core (pytest-xdist), and the tiny
    # models here gain nothing from threads that wait for each other (several times slower on a loaded machine).
    # Subprocesses (main.py runs, Slurm jobs) inherit the variable; DDP on CPU still sets its own share.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # one real Slurm cluster per session: under pytest-xdist (--dist loadgroup) every Slurm test runs in one worker
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


def pytest_unconfigure(config):
    for home in _HOME:
        shutil.rmtree(home, ignore_errors=True)


# a model small enough for CPU tests: every size differs from the others so a swapped dimension shows up
TINY_FLAGS = {
    "backbone": "resnet18",
    "backbone_weights": "none",
    "hidden_dim": 32,
    "nheads": 4,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 48,
    "num_queries": 6,
    "num_classes": 9,
    "device": "cpu",
}


def make_args(**overrides):
    """Resolved args (run_setup.resolve_args) for the tiny model; ``True`` turns on a store_true flag, ``False``
    leaves it off, other values are passed as ``--name value``."""
    import main
    import run_setup

    flags = {**TINY_FLAGS, **overrides}
    argv = []
    for name, value in flags.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not False and value is not None:
            argv += [f"--{name}", str(value)]
    args = main.get_args_parser().parse_args(argv)
    run_setup.resolve_args(args)
    return args


@pytest.fixture
def tiny_args():
    """Factory: ``tiny_args(dynamic_scale="type2", query_mixture=True)`` -> resolved args namespace."""
    return make_args


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests: on a small shared CPU, OpenMP threads that wait for
    each other cost far more than they save (several times slower under load). Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# main.py flags of a run that takes seconds on a CPU (the CLI tests of run folders and faults)
TINY_CLI = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
            "--enc_layers", "1", "--dec_layers", "2", "--nheads", "4", "--num_queries", "10", "--batch_size", "2",
            "--synthetic_train_size", "8", "--synthetic_val_size", "4", "--synthetic_image_size", "64",
            "--device", "cpu", "--num_workers", "0", "--max_iters_per_epoch", "2", "--eval_every", "100"]


@pytest.fixture(scope="session")
def cli_synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory, cli_synthetic_root):
    """(folder, argv): a real 1-epoch run of TINY_CLI through main.py, evaluated at its end. Read only: tests that
    change it work on a copy."""
    from tests.cli import run_main

    folder = tmp_path_factory.mktemp("finished") / "run"
    argv = [*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "1", "--output_dir", str(folder)]
    result = run_main(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, argv


# the tiny SMCA model main.py trains for the inference tests (type2 with both mixtures, so some heads and queries
# have no prior), and the synthetic set it trains on (64-px images)
TINY_TRAIN_FLAGS = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
                    "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "2", "--nheads", "4",
                    "--num_queries", "10", "--batch_size", "2", "--synthetic_train_size", "8",
                    "--synthetic_val_size", "4", "--synthetic_image_size", "64", "--device", "cpu",
                    "--num_workers", "0", "--epochs", "1", "--max_iters_per_epoch", "2",
                    "--dynamic_scale", "type2", "--head_mixture", "--query_mixture"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(checkpoint path, synthetic root) of a real main.py run: one epoch of two steps."""
    from tests.cli import run_main

    synthetic_root = tmp_path_factory.mktemp("synthetic_tiny")
    out = tmp_path_factory.mktemp("tiny_run")
    result = run_main([*TINY_TRAIN_FLAGS, "--synthetic_root", str(synthetic_root), "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "checkpoint.pth", synthetic_root
