"""Can a run start in a folder? The sbatch scripts' skip check (rundir/run_folder.py's ``status``), as a command:
one line saying why, and the exit code (0: free to start or resume, 3: finished, 4: live, 2: error).

    python -m slurm.status DIR [--epochs N] [--owner_timeout S]
    python -m slurm.status -- MAIN_PY_FLAGS...     # DIR and --epochs taken from main.py's flags
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rundir import lease, run_folder  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m slurm.status",
                                     description="Can a run start in DIR? 0: yes, 3: finished, 4: live, 2: error.")
    parser.add_argument("folder", nargs="?", help="the run's --output_dir")
    parser.add_argument("--epochs", type=int, default=None, help="the run's --epochs (finished.json may say fewer)")
    parser.add_argument("--owner_timeout", type=float, default=lease.DEFAULT_TIMEOUT_S)
    return parser


def cli(argv) -> int:
    main_argv = argv[argv.index("--") + 1:] if "--" in argv else None
    args = get_parser().parse_args(argv[:argv.index("--")] if main_argv is not None else argv)
    if main_argv is not None:
        import options  # main.py's flags (imports torch: only for this form)

        run, _ = options.get_args_parser().parse_known_args(main_argv)
        args.folder, args.epochs, args.owner_timeout = run.output_dir, run.epochs, run.owner_timeout
    if not args.folder:
        print("error: no run folder: pass DIR, or main.py's flags with --output_dir after --", file=sys.stderr)
        return 2
    code, line = run_folder.status(args.folder, args.epochs, args.owner_timeout)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
