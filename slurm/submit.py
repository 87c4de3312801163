"""Submit one training run to Slurm with submitit (one task per GPU, requeued on preemption/timeout).

    python slurm/submit.py --partition P --ngpus 8 --nodes 2 --timeout 2880 \\
        --output_dir runs/type2_qm --dynamic_scale type2 --query_mixture

Every flag of main.py is accepted (main's parser is the parent); the job always resumes with
``--resume auto`` from <output_dir>/checkpoint.pth. submitit's pickles and logs go to --job_dir
(default <output_dir>/submitit). A run that is finished (finished.json for its --epochs) or live (a job
trains it now) is not submitted again; the launcher says which.
"""
import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import options  # noqa: E402
from experiments.sweeps import check_portable  # noqa: E402
from slurm.common import (Trainer, add_slurm_args, check_slurm_args, make_executor, set_flag,  # noqa: E402
                          slurm_flag_names)
from util.errors import UserError  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser("python slurm/submit.py", parents=[options.get_args_parser()], allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_slurm_args(parser)


def main_argv(argv):
    """The part of ``argv`` that is main.py's (everything but the Slurm flags, which all take a value)."""
    slurm_flags, out, tokens = slurm_flag_names(), [], iter(argv)
    for token in tokens:
        name = token.split("=", 1)[0]
        if name in slurm_flags:
            if "=" not in token:
                next(tokens, None)
            continue
        out.append(token)
    return out


def submit(argv):
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.output_dir:
        parser.error("--output_dir is required (checkpoints, logs and resuming live there)")
    try:
        check_slurm_args(args)
        check_portable(args)
    except UserError as exc:
        parser.error(str(exc))
    from rundir import run_folder  # torch: after parsing, so --help answers at once

    output_dir = Path(args.output_dir).resolve()
    status, line = run_folder.status(output_dir, args.epochs, args.owner_timeout)
    if status in (run_folder.STATUS_FINISHED, run_folder.STATUS_LIVE):
        print(f"skip ({'finished' if status == run_folder.STATUS_FINISHED else 'live'}): {line}")
        return None
    run_argv = set_flag(main_argv(argv), "--output_dir", output_dir)
    job_dir = Path(args.job_dir).resolve() if args.job_dir else output_dir / "submitit"
    try:
        executor = make_executor(args, job_dir, "run python main.py with the same flags here, or submit from a "
                                                "Slurm login node (sbatch slurm/train.sbatch, or srun)")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    job = executor.submit(Trainer(run_argv))
    print(f"submitted job {job.job_id}: main.py {shlex.join(run_argv)}")
    print(f"stdout: {job.paths.stdout}")
    print(f"stderr: {job.paths.stderr}")
    return job


if __name__ == "__main__":
    submit(sys.argv[1:])
