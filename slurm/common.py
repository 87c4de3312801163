"""What slurm/submit.py and slurm/sweep.py share: the Slurm flags, the executor, the job callable."""
import argparse
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def add_slurm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("slurm")
    group.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    group.add_argument("--nodes", default=1, type=int, help="nodes per run")
    group.add_argument("--ngpus", default=4, type=int,
                       help="GPUs per node = tasks per node; 0 for a CPU-only partition (1 task, no gres)")
    group.add_argument("--cpus_per_task", default=8, type=int)
    group.add_argument("--timeout", default=2880, type=int, help="time limit per job in minutes")
    group.add_argument("--job_name", default="smca_detr")
    group.add_argument("--comment", default=None)
    group.add_argument("--constraint", default=None, help="e.g. volta32gb")
    group.add_argument("--account", default=None)
    group.add_argument("--qos", default=None)
    group.add_argument("--mem", default=None, help="memory per node as sbatch takes it, e.g. 64G (default: cluster's)")
    group.add_argument("--job_dir", default=None, help="submitit's pickles and logs (default: <output_dir>/submitit)")
    return parser


def slurm_flag_names() -> set:
    """Option strings of add_slurm_args (to tell them from main.py's flags in one argv)."""
    parser = add_slurm_args(argparse.ArgumentParser(add_help=False))
    return {o for a in parser._actions for o in a.option_strings}


def check_slurm_args(args) -> None:
    from util.errors import UserError

    if args.nodes < 1 or args.ngpus < 0 or args.cpus_per_task < 1 or args.timeout < 1:
        raise UserError("--nodes, --cpus_per_task and --timeout must be >= 1 and --ngpus >= 0")


def make_executor(args, folder, without_slurm: str):
    """A submitit Slurm executor: one task per GPU (one task on --ngpus 0), --signal USR2 120 s before
    the time limit (submitit then calls Trainer.checkpoint and requeues). Without Slurm's commands a UserError
    names the missing one and ends with ``without_slurm`` (what to do instead)."""
    import shutil

    import submitit

    from util.errors import UserError

    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        raise UserError(f"no Slurm here: {' and '.join(missing)} not found on PATH; {without_slurm}")

    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=30)
    optional = {name: getattr(args, name) for name in ("comment", "constraint", "account", "qos", "mem")
                if getattr(args, name)}
    if args.partition:
        optional["partition"] = args.partition
    if args.ngpus > 0:
        optional["gres"] = f"gpu:{args.ngpus}"
    executor.update_parameters(
        name=args.job_name, nodes=args.nodes, tasks_per_node=max(args.ngpus, 1),
        cpus_per_task=args.cpus_per_task, timeout_min=args.timeout,
        slurm_signal_delay_s=120,
        # the pickled Trainer is loaded by reference (slurm.common.Trainer): the job needs the repo importable
        slurm_setup=[f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
        **{f"slurm_{k}": v for k, v in optional.items()})
    return executor


class Trainer:
    """The submitit job: main.main on main.py's flags ``argv``, resumable.

    Every task sets torch.distributed's variables from submitit's JobEnvironment (so util.dist takes the
    torchrun path), and runs with ``--resume auto`` once <output_dir>/checkpoint.pth exists; before
    that an explicit ``--resume PATH`` or ``--finetune_from PATH`` of the first start is kept. ``checkpoint()`` (called by submitit on
    its time-limit/preemption signal) resubmits the same flags: the requeued job resumes from
    <output_dir>/checkpoint.pth.
    """

    def __init__(self, argv):
        self.argv = list(argv)

    def __call__(self):
        import submitit

        import main
        from rundir import run_config
        from util import dist

        env = submitit.JobEnvironment()
        os.environ.update(
            RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
            MASTER_ADDR=env.hostnames[0],
            MASTER_PORT=str(dist.slurm_master_port(os.environ.get("SLURM_JOB_ID", "0"),
                                                   os.environ.get("SLURM_ARRAY_TASK_ID"),
                                                   os.environ.get("SLURM_ARRAY_JOB_ID"))))
        parser = argparse.ArgumentParser(parents=[main.get_args_parser()], allow_abbrev=False)
        args = parser.parse_args(self.argv)
        if (Path(args.output_dir) / "checkpoint.pth").exists():
            # a requeued or resubmitted run continues itself (also one that started with --finetune_from)
            args.resume, args.finetune_from = "auto", ""
        elif args.finetune_from:
            args.resume = ""
        elif not args.resume:
            args.resume = "auto"
        print(f"submitit job {env.job_id} task {env.global_rank}/{env.num_tasks} on {env.hostname}: "
              f"main.py {' '.join(self.argv)} (resume {args.resume})", flush=True)
        try:
            return main.main(args, run_config.explicit_flags(parser, self.argv))
        finally:
            dist.cleanup()

    def checkpoint(self, *unused):
        import submitit

        return submitit.helpers.DelayedSubmission(Trainer(self.argv))


def set_flag(argv, flag, value):
    """argv without any ``flag value`` / ``flag=value``, then ``flag value`` at the end."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        elif not token.startswith(flag + "="):
            out.append(token)
    return out + [flag, str(value)]

