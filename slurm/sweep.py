"""Submit a sweep file as one submitit job array: one job per run, --output_dir <root>/<name>.

    python slurm/sweep.py experiments/smca_table.sweep --root runs/smca_table --partition P --ngpus 8
    python slurm/sweep.py experiments/smca_table.sweep --root runs/smca_table --dry_run
    python slurm/sweep.py experiments/smca_table.sweep --root runs/smca_table --only focal_300_type1_no_scale
    python slurm/sweep.py experiments/smca_table.sweep --root runs/smca_table -- --coco_path /data/coco
    python slurm/sweep.py experiments/smca_table.sweep --root runs/smca_table --seeds 0 1 2 --dry_run

main.py flags after '--' are added to every run (after the sweep file's own flags).
--seeds K... runs every run once per seed into <root>/<name>/seed<K> (replacing the file's 'seeds:' line);
--only takes a run line's name (all its seeds) or '<name>/seed<K>'.

Runs that are finished (<root>/<name>/finished.json for their --epochs) or live (a job trains them now) are
skipped, saying which; the others (new or interrupted) are submitted with --resume auto, so submitting the
same sweep again, also while some of its jobs still run, continues where it stopped.
submitit's pickles and logs go to --job_dir (default <root>/submitit).
"""
import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.sweeps import SEED_FLAG, Run, read_sweep, select, validate  # noqa: E402
from slurm.common import Trainer, add_slurm_args, check_slurm_args, make_executor  # noqa: E402
from util.errors import UserError  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser("python slurm/sweep.py", allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file")
    parser.add_argument("--root", required=True, help="runs go to ROOT/<name>")
    parser.add_argument("--dry_run", action="store_true", help="print the command of every run, submit nothing")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="submit only these runs (a run line's name selects all its seeds)")
    parser.add_argument("--seeds", nargs="+", default=None, metavar="K",
                        help="every run once per seed K into ROOT/<name>/seed<K> (replaces the file's seeds: line)")
    return add_slurm_args(parser)


def plan(args, extra=()):
    """[(run, argv for main.py, status code, status line)] for the selected runs, in index order (status:
    rundir.run_folder.status); ``extra`` main.py flags are appended to every run (validated with it)."""
    from rundir import run_folder  # torch: after parsing, so --help answers at once
    runs = read_sweep(args.sweep_file, seeds=args.seeds)
    if any(run.seed is not None for run in runs) and any(f.split("=", 1)[0] == SEED_FLAG for f in extra):
        raise UserError(f"{SEED_FLAG} after '--' would override the seed of every run; the seeds come from "
                        f"--seeds or the sweep file's seeds: line")
    runs = [Run(run.name, run.argv + list(extra), run.line, run.base, run.seed) for run in runs]
    parsed = {run.name: validate(run, args.sweep_file) for run in runs}
    if args.only:
        runs = select(runs, args.only, args.sweep_file)
    root = Path(args.root).resolve()
    return [(run, run.command_argv(root) + ["--resume", "auto"],
             *run_folder.status(root / run.name, parsed[run.name].epochs, parsed[run.name].owner_timeout))
            for run in runs]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = get_parser()
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    try:
        check_slurm_args(args)
        todo = plan(args, extra)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rundir import run_folder

    skipped = {run_folder.STATUS_FINISHED: "finished", run_folder.STATUS_LIVE: "live"}
    pending = []
    for run, run_argv, status, line in todo:
        if status in skipped:
            print(f"skip ({skipped[status]}): {run.name}: {line}")
        elif args.dry_run:
            print(shlex.join(["python", "main.py", *run_argv]))
        else:
            pending.append((run, run_argv))
    if args.dry_run or not pending:
        if not args.dry_run:
            print("nothing to submit: every selected run is finished or live")
        return 0
    job_dir = Path(args.job_dir).resolve() if args.job_dir else Path(args.root).resolve() / "submitit"
    try:
        executor = make_executor(args, job_dir, "--dry_run prints each run's main.py command, to run here or "
                                                "with srun/sbatch on a Slurm login node")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with executor.batch():
        jobs = [executor.submit(Trainer(run_argv)) for _, run_argv in pending]
    for (run, _), job in zip(pending, jobs):
        print(f"submitted {run.name}: job {job.job_id}  stdout {job.paths.stdout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
