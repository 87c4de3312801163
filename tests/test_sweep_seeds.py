"""Seeds as a sweep axis: the 'seeds:' line and --seeds in the reader, its CLI, slurm/sweep.py (dry run) and
slurm/sweep.sbatch (array tasks pick the same runs as --list/--count)."""
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import sweeps
from util.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
COMMON = "--dataset_file synthetic --epochs 2 --device cpu"
SWEEP = f"""# two runs, three seeds
common: {COMMON}
seeds: 0 1 2
detr  --dynamic_scale none
type2 --dynamic_scale type2 --smooth 4
"""


def _write(tmp_path, text, name="s.sweep"):
    path = tmp_path / name
    path.write_text(text)
    return path


def expected(seeds, names=("detr", "type2")):
    """Seed-major: every run with the first seed, then every run with the next."""
    own = {"detr": ["--dynamic_scale", "none"], "type2": ["--dynamic_scale", "type2", "--smooth", "4"]}
    return [(f"{name}/seed{k}", COMMON.split() + own[name] + ["--seed", str(k)], name, k)
            for k in seeds for name in names]


@pytest.mark.quick
def test_seeds_line_expands_every_run_seed_major(tmp_path):
    runs = sweeps.read_sweep(_write(tmp_path, SWEEP))
    assert [(r.name, r.argv, r.base, r.seed) for r in runs] == expected([0, 1, 2])
    assert [r.line for r in runs] == [4, 5] * 3
    assert runs[3].command_argv("/r")[-2:] == ["--output_dir", "/r/type2/seed1"]
    assert sweeps.validate(runs[3], "s.sweep").seed == 1


def test_seeds_override_replaces_the_file_list_or_adds_one(tmp_path):
    runs = sweeps.read_sweep(_write(tmp_path, SWEEP), seeds=[7, 3])
    assert [(r.name, r.argv, r.base, r.seed) for r in runs] == expected([7, 3])
    plain = _write(tmp_path, SWEEP.replace("seeds: 0 1 2\n", ""), "plain.sweep")
    assert [(r.name, r.seed) for r in sweeps.read_sweep(plain)] == [("detr", None), ("type2", None)]
    assert [r.name for r in sweeps.read_sweep(plain, seeds=["5"])] == ["detr/seed5", "type2/seed5"]


@pytest.mark.parametrize("text, seeds, message", [
    (SWEEP.replace("--smooth 4", "--smooth 4 --seed 9"), None,
     "s.sweep:5: --seed is set per run by the seeds (line 3); remove it from the line"),
    (SWEEP.replace("common: ", "common: --seed=9 "), None, "s.sweep:2: --seed is set per run by the seeds"),
    (SWEEP.replace("seeds: 0 1 2\n", "").replace("--smooth 4", "--smooth 4 --seed 9"), [1],
     "s.sweep:4: --seed is set per run by the seeds (--seeds)"),
    (SWEEP.replace("0 1 2", "0 1 1"), None, "s.sweep:3: seed 1 is listed twice"),
    (SWEEP.replace("0 1 2", "0 -1"), None, "s.sweep:3: seed '-1' is not a non-negative integer"),
    (SWEEP.replace("0 1 2", ""), None, "s.sweep:3: no seeds given"),
    (SWEEP + "seeds: 4\n", None, "s.sweep:6: second 'seeds:' line (the first is line 3)"),
    (SWEEP, ["x"], "--seeds: seed 'x' is not a non-negative integer"),
])
@pytest.mark.quick
def test_seed_errors_name_the_line(tmp_path, text, seeds, message):
    with pytest.raises(UserError) as info:
        sweeps.read_sweep(_write(tmp_path, text), seeds=seeds)
    assert message in str(info.value)


def _cli(*args):
    return subprocess.run([PY, "-m", "experiments.sweeps", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_cli_list_count_line_with_seeds_and_override(tmp_path):
    path = str(_write(tmp_path, SWEEP))
    assert _cli(path, "--list", "--no_check").stdout.split() == [name for name, *_ in expected([0, 1, 2])]
    assert _cli(path, "--count", "--no_check").stdout == "6\n"
    assert _cli(path, "--count", "--no_check", "--seeds", "0", "1", "2", "3").stdout == "8\n"
    line = _cli(path, "--line", "5", "--root", "/r", "--seeds", "4", "5", "6").stdout.strip()
    assert shlex.split(line) == expected([4, 5, 6])[5][1] + ["--output_dir", "/r/type2/seed6"]
    bad = _cli(path, "--list", "--seeds", "1", "1")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --seeds: seed 1 is listed twice"


def _sweep_py(*args):
    return subprocess.run([PY, "slurm/sweep.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_sweep_py_dry_run_only_and_finished_with_seeds(tmp_path):
    path, root = str(_write(tmp_path, SWEEP)), tmp_path / "root"
    commands = [shlex.join(["python", "main.py", *argv, "--output_dir", str(root / name), "--resume", "auto"])
                for name, argv, *_ in expected([0, 1, 2])]
    proc = _sweep_py(path, "--root", str(root), "--dry_run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == commands

    (root / "type2" / "seed1").mkdir(parents=True)
    (root / "type2" / "seed1" / "finished.json").write_text("{}")
    proc = _sweep_py(path, "--root", str(root), "--dry_run", "--only", "type2", "detr/seed2")
    assert proc.stdout.splitlines() == [commands[1], f"skip (finished): type2/seed1: {root}/type2/seed1 is finished "
                                                     f"(finished.json, without an epoch count)", commands[4], commands[5]]

    proc = _sweep_py(path, "--root", str(root), "--dry_run", "--seeds", "9", "--only", "detr")
    assert proc.stdout.splitlines() == [shlex.join(["python", "main.py", *expected([9])[0][1], "--output_dir",
                                                    str(root / "detr" / "seed9"), "--resume", "auto"])]

    proc = _sweep_py(path, "--root", str(root), "--dry_run", "--only", "detr/seed7")
    assert proc.returncode == 2 and "--only detr/seed7: not in" in proc.stderr and "(runs: detr type2)" in proc.stderr
    proc = _sweep_py(path, "--root", str(root), "--dry_run", "--", "--seed", "3")
    assert proc.returncode == 2 and "--seed after '--' would override the seed of every run" in proc.stderr


def test_sweep_sbatch_array_tasks_follow_seeds(tmp_path):
    """The sbatch script's own logic, run by bash with Slurm's array variables set. srun is a recording stand-in
    here (Slurm is not needed to check which run a task picks); tests/test_slurm.py runs the script on a real
    cluster."""
    path, root = _write(tmp_path, SWEEP), tmp_path / "root"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_RECORD"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)

    def task(index, seeds=None, array_max=None, extra=()):
        record = tmp_path / f"srun-{index}-{seeds}.txt"
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": PY, "SLURM_SUBMIT_DIR": str(REPO),
               "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1",
               "SRUN_RECORD": str(record)}
        env.pop("SEEDS", None)
        if seeds is not None:
            env["SEEDS"] = seeds
        if array_max is not None:
            env["SLURM_ARRAY_TASK_MAX"] = str(array_max)
        proc = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sbatch"), str(path), str(root), *extra],
                              capture_output=True, text=True, timeout=300, env=env)
        # what srun would start, without srun's own options
        argv = record.read_text().splitlines() if record.exists() else None
        return proc, (argv[argv.index(PY):] if argv else None)

    proc, argv = task(3, array_max=5)
    assert proc.returncode == 0, proc.stderr
    name, run_argv, *_ = expected([0, 1, 2])[3]
    assert argv == [PY, "main.py", *run_argv, "--output_dir", f"{root}/{name}", "--resume", "auto"]
    assert proc.stderr == ""

    proc, argv = task(5, seeds="4 5 6", array_max=3)
    name, run_argv, *_ = expected([4, 5, 6])[5]
    assert argv == [PY, "main.py", *run_argv, "--output_dir", f"{root}/{name}", "--resume", "auto"]
    assert "warning: the array ends at task 3 but" in proc.stderr and "has 6 runs with SEEDS=\"4 5 6\"" in proc.stderr

    (root / "detr" / "seed1").mkdir(parents=True)
    (root / "detr" / "seed1" / "finished.json").write_text("{}")
    proc, argv = task(2)
    assert proc.returncode == 0 and argv is None and proc.stdout.startswith("skip (finished): detr/seed1")

    proc, argv = task(6)
    assert proc.returncode == 2 and argv is None and "has no run 6 (runs 0..5" in proc.stderr
    proc, argv = task(0, extra=("--seed", "3"))
    assert proc.returncode == 2 and argv is None and "--seed after ROOT would override" in proc.stderr


def test_synthetic_convergence_sweep_runs_three_seeds_on_one_data_set():
    runs = sweeps.read_sweep(REPO / "experiments" / "synthetic_convergence.sweep")
    bases = list(dict.fromkeys(run.base for run in runs))
    assert len(runs) == 3 * len(bases) and {run.seed for run in runs} == {0, 1, 2}
    for run in runs:
        args = sweeps.validate(run, "synthetic_convergence.sweep")
        # the seeds vary the training only: every run reads the same generated set
        assert args.seed == run.seed and args.synthetic_seed == 42
