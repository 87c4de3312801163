"""slurm/sweep.py (dry runs, an array of the unfinished runs on a real one-node Slurm cluster, tests/slurm_cluster.py)
and the sweep-file reader (experiments/sweeps.py): the SMCA table, flags, comments, errors, the command line."""
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from experiments import sweeps
from test_slurm import PY, REPO, WAIT_S, _hold_lease, logged_epochs
from test_slurm import synthetic_root  # noqa: F401 (a fixture)
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)
from util.errors import UserError

pytestmark = pytest.mark.slurm

SMCA_TABLE = REPO / "experiments" / "smca_table.sweep"


# ------------------------------------------------------------------------------ slurm/sweep.py

TABLE = [  # name, own flags (after the common ones)
    ("focal_300_type1_no_scale", "--dynamic_scale type1"),
    ("focal_300_type3_xy_scale", "--dynamic_scale type3"),
    ("focal_300_type4_covarince_scale", "--dynamic_scale type4"),
    ("focal_300_type2_scale_head_mixture", "--dynamic_scale type2 --head_mixture"),
    ("focal_300_type2_scale_query_mixture", "--dynamic_scale type2 --query_mixture"),
    ("focal_300_type2_single_scale_smooth_4", "--dynamic_scale type2 --smooth 4"),
    ("focal_300_type2_single_scale_smooth_16", "--dynamic_scale type2 --smooth 16"),
    ("focal_300_type2_scale_query_mixture_150", "--dynamic_scale type2 --query_mixture --lr_drop 100 --epochs 150"),
    ("focal_300_type2_scale_query_mixture_500", "--dynamic_scale type2 --query_mixture --lr_drop 400 --epochs 500"),
]
TABLE_COMMON = "--dataset_file coco --num_queries 300 --lr_drop 40 --epochs 50 --batch_size 4"


def _sweep_py(*args):
    return subprocess.run([PY, "slurm/sweep.py", *args], cwd=REPO, capture_output=True, text=True, timeout=WAIT_S)


def test_sweep_dry_run_prints_every_command_and_only_filters(tmp_path):
    root = tmp_path / "table"
    proc = _sweep_py(str(SMCA_TABLE), "--root", str(root), "--partition", "gpu", "--ngpus", "8", "--dry_run")
    assert proc.returncode == 0, proc.stderr
    expected = [f"python main.py {TABLE_COMMON} {flags} --output_dir {root}/{name} --resume auto"
                for name, flags in TABLE]
    assert proc.stdout.splitlines() == expected

    only = [TABLE[0][0], TABLE[1][0], TABLE[8][0]]
    (root / TABLE[0][0]).mkdir(parents=True)
    (root / TABLE[0][0] / "finished.json").write_text('{"epochs": 50, "metrics": {}}')
    live = _hold_lease(root / TABLE[1][0])
    try:
        proc = _sweep_py(str(SMCA_TABLE), "--root", str(root), "--dry_run", "--only", *only)
    finally:
        live.proc.stdin.close()
        live.finish()
    lines = proc.stdout.splitlines()
    assert lines[0] == f"skip (finished): {TABLE[0][0]}: {root}/{TABLE[0][0]} finished 50 epochs (finished.json)"
    assert re.fullmatch(rf"skip \(live\): {TABLE[1][0]}: {root}/{TABLE[1][0]} is in use by another run \(host \S+, "
                        rf"pid {live.pid}, since \S+; pid {live.pid} is running on this host \(its heartbeat is \d+ s "
                        rf"old\)\)", lines[1]), lines
    assert lines[2:] == [expected[8]]
    # extending a finished run (its sweep line asks for more epochs) is not skipped
    (root / TABLE[0][0] / "finished.json").write_text('{"epochs": 40, "metrics": {}}')
    proc = _sweep_py(str(SMCA_TABLE), "--root", str(root), "--dry_run", "--only", TABLE[0][0])
    assert proc.stdout.splitlines() == [expected[0]]

    proc = _sweep_py(str(SMCA_TABLE), "--root", str(root), "--dry_run", "--only", "focal_300_typo")
    assert proc.returncode == 2 and "--only focal_300_typo: not in" in proc.stderr


def test_sweep_py_submits_an_array_of_unfinished_runs(slurm_cluster, tmp_path, synthetic_root):
    root = tmp_path / "smoke"
    smoke = REPO / "experiments" / "synthetic_smoke.sweep"
    done, todo = [run.name for run in sweeps.read_sweep(smoke, check=False)]
    (root / done).mkdir(parents=True)
    (root / done / "finished.json").write_text('{"epochs": 1, "metrics": {}}')
    proc = slurm_cluster.run([PY, "slurm/sweep.py", str(smoke), "--root", str(root), "--partition", "debug",
                              "--ngpus", "0", "--cpus_per_task", "1", "--timeout", "10", "--",
                              "--synthetic_root", synthetic_root], cwd=REPO, timeout=WAIT_S)
    assert proc.stdout.splitlines()[0] == f"skip (finished): {done}: {root / done} finished 1 epoch (finished.json)"
    job_id = re.search(rf"^submitted {todo}: job (\S+)  stdout (\S+)$", proc.stdout, re.M)
    assert job_id, proc.stdout
    job = slurm_cluster.wait_job(job_id.group(1), WAIT_S)[0]
    assert job["JobState"] == "COMPLETED", Path(job_id.group(2)).read_text()
    assert (root / todo / "finished.json").exists() and logged_epochs(root / todo) == [0]
    assert sorted(p.name for p in (root / done).iterdir()) == ["finished.json"]  # untouched


@pytest.mark.quick
def test_smca_table_resolves_to_focal_for_every_run():
    import options

    runs = sweeps.read_sweep(SMCA_TABLE)
    assert [r.name for r in runs] == [name for name, _ in TABLE]
    for run, (_, flags) in zip(runs, TABLE):
        args = options.get_args_parser().parse_args(run.argv + ["--device", "cpu"])
        options.resolve_loss(args)
        assert args.cls_loss == "focal" and args.num_queries == 300 and args.batch_size == 4
        assert args.epochs == (int(flags.split("--epochs ")[1]) if "--epochs" in flags else 50)


# ------------------------------------------------------------------------------ sweep-file reader

def _write(tmp_path, text):
    path = tmp_path / "t.sweep"
    path.write_text(text)
    return path


@pytest.mark.quick
def test_reader_common_first_run_flags_override_and_comments(tmp_path):
    path = _write(tmp_path, "# header\n\nfirst --lr 2e-4   # trailing comment\ncommon: --epochs 5 --lr 1e-4\n"
                            "second --smooth 4 --dynamic_scale type2 --synthetic_root 'a b'\n")
    runs = sweeps.read_sweep(path)
    assert [(r.name, r.argv, r.line) for r in runs] == [
        ("first", ["--epochs", "5", "--lr", "1e-4", "--lr", "2e-4"], 3),
        ("second", ["--epochs", "5", "--lr", "1e-4", "--smooth", "4", "--dynamic_scale", "type2",
                    "--synthetic_root", "a b"], 5)]
    assert sweeps.validate(runs[0], path).lr == 2e-4  # the run's own value wins


@pytest.mark.parametrize("text, message", [
    ("a --epochs 2\nb --epoch 3\n", "t.sweep:2: run 'b': unrecognized arguments: --epoch 3"),
    ("a --dynamic_scale type9\n", "t.sweep:1: run 'a': argument --dynamic_scale: invalid choice: 'type9'"),
    ("a --lr fast\n", "t.sweep:1: run 'a': argument --lr: must be a finite number >= 0, got 'fast'"),
    ("a --head_mixture\n", "t.sweep:1: run 'a': --head_mixture mixes the spatial prior"),
    ("common: --bogus 1\na --lr 1\n", "t.sweep:1: run 'common': unrecognized arguments: --bogus 1"),
    ("a --lr 1\n\na --lr 2\n", "t.sweep:3: duplicate run name 'a' (first on line 1)"),
    ("a/b --lr 1\n", "t.sweep:1: run name 'a/b' must be"),
    ("a --output_dir x\n", "t.sweep:1: --output_dir is set by the launcher"),
    ("common: --lr 1\ncommon: --lr 2\na\n", "t.sweep:2: second 'common:' line (the first is line 1)"),
    ("# nothing\n", "no runs"),
])
def test_reader_errors_name_file_line_and_flag(tmp_path, text, message):
    with pytest.raises(UserError) as info:
        sweeps.read_sweep(_write(tmp_path, text))
    assert message in str(info.value)


def test_reader_cli_list_count_line(tmp_path):
    path = _write(tmp_path, "common: --epochs 2\nx_1 --synthetic_root 'dir with space'\ny.2 --lr 3e-4\n")

    def cli(*args):
        return subprocess.run([PY, "-m", "experiments.sweeps", str(path), *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    assert cli("--list", "--no_check").stdout == "x_1\ny.2\n"
    assert cli("--count", "--no_check").stdout == "2\n"
    line = cli("--line", "0", "--root", "/r").stdout.strip()
    assert line == "--epochs 2 --synthetic_root 'dir with space' --output_dir /r/x_1"
    assert shlex.split(line)[3] == "dir with space"
    bad = cli("--line", "2")
    assert bad.returncode == 2 and "--line 2:" in bad.stderr and "runs 0..1" in bad.stderr
