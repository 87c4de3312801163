"""Sweep files: a readable list of runs, one line each.

Format (see experiments/smca_table.sweep)::

    # comment (also after flags)
    common: --num_queries 300 --epochs 50        # flags for every run, at most one such line
    focal_300_type1_no_scale --dynamic_scale type1
    focal_300_type2_smooth_4 --dynamic_scale type2 --smooth 4

A run line is ``<name> <flags...>``; the name ([A-Za-z0-9_.-]) is the run's output folder
``<root>/<name>``. A run's argv is the common flags followed by its own, so its own win (argparse keeps
the last value). Flags are split like a shell would (quotes work). ``--output_dir`` is not allowed in
the file: the launchers set it from the name.

Every run is checked against main.py's parser: an unknown flag or a bad value is a UserError naming
the file, the line and the flag.

CLI (used by slurm/sweep.sbatch)::

    python -m experiments.sweeps FILE --list             # names, one per line, in index order
    python -m experiments.sweeps FILE --count
    python -m experiments.sweeps FILE --line N [--root DIR]   # argv of run N, shell-quoted
"""
import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from util.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED_FLAGS = ("--output_dir",)


@dataclass(frozen=True)
class Run:
    name: str
    argv: list  # common flags first, then the run's own
    line: int = 0  # 1-based line number in the sweep file (for messages)

    def command_argv(self, root=None):
        """argv for main.py, with --output_dir <root>/<name> when a root is given."""
        return self.argv + (["--output_dir", str(Path(root) / self.name)] if root is not None else [])


def _parse_lines(path):
    """(lineno, tokens) for every non-empty, non-comment line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"sweep file {path}: cannot read ({exc.strerror})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise UserError(f"{path}:{lineno}: cannot split the line ({exc}); check the quotes") from None
        if tokens:
            yield lineno, tokens


def read_sweep(path, check=True):
    """The runs of a sweep file, in file order; ``check`` validates each against main.py's parser."""
    common, common_line, runs, seen = [], None, [], {}
    for lineno, tokens in _parse_lines(path):
        head = tokens[0]
        if head == "common:" or head.startswith("common:"):
            if common_line is not None:
                raise UserError(f"{path}:{lineno}: second 'common:' line (the first is line {common_line}); "
                                f"merge them into one")
            rest = head[len("common:"):]
            common, common_line = ([rest] if rest else []) + tokens[1:], lineno
            _check_reserved(path, lineno, common)
            continue
        if not NAME_RE.match(head):
            raise UserError(f"{path}:{lineno}: run name {head!r} must be letters, digits, '_', '.' or '-' "
                            f"(it becomes the output folder); a run line is '<name> <flags...>'")
        if head in seen:
            raise UserError(f"{path}:{lineno}: duplicate run name {head!r} (first on line {seen[head]}); "
                            f"names are output folders and must be unique")
        seen[head] = lineno
        _check_reserved(path, lineno, tokens[1:])
        runs.append((lineno, head, tokens[1:]))
    if not runs:
        raise UserError(f"sweep file {path}: no runs (a run line is '<name> <flags...>')")
    # 'common:' may come after some runs; it applies to all of them
    result = [Run(name, common + flags, lineno) for lineno, name, flags in runs]
    if check:
        parser = _strict_parser()
        if common_line is not None:
            validate(Run("common", common, common_line), path, parser)
        for run in result:
            validate(run, path, parser)
    return result


def _check_reserved(path, lineno, flags):
    for flag in flags:
        if flag.split("=", 1)[0] in RESERVED_FLAGS:
            raise UserError(f"{path}:{lineno}: {flag.split('=', 1)[0]} is set by the launcher "
                            f"(<root>/<run name>); remove it from the sweep file")


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def _strict_parser():
    import options  # torch: imported only when validating

    return _RaisingParser("sweep", parents=[options.get_args_parser()], add_help=False, allow_abbrev=False)


def validate(run, path, parser=None):
    """Parse ``run.argv`` with main.py's flags and checks; UserError '<file>:<line>: <flag problem>'."""
    parser = parser or _strict_parser()
    try:
        args = parser.parse_args(run.argv)
        check_portable(args)
    except UserError as exc:
        raise UserError(f"{path}:{run.line}: run {run.name!r}: {exc}") from None
    return args


def check_portable(args):
    """main.check_args, except what depends on the machine: device and AMP are properties of the node
    the job lands on, so a login node without GPUs can validate a GPU run."""
    import options

    probe = argparse.Namespace(**vars(args))
    probe.device, probe.amp = "cpu", False
    options.check_args(probe)


def main_cli(argv=None):
    parser = argparse.ArgumentParser("python -m experiments.sweeps", description="Read a sweep file.")
    parser.add_argument("sweep_file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="run names, one per line, in index order")
    what.add_argument("--count", action="store_true", help="number of runs")
    what.add_argument("--line", type=int, metavar="N", help="argv of run N (0-based), shell-quoted")
    parser.add_argument("--root", default=None, help="with --line: append --output_dir ROOT/<name>")
    parser.add_argument("--no_check", action="store_true",
                        help="skip validation against main.py (fast; main.py checks the flags anyway)")
    args = parser.parse_args(argv)
    try:
        runs = read_sweep(args.sweep_file, check=not args.no_check)
        if args.list:
            print("\n".join(run.name for run in runs))
        elif args.count:
            print(len(runs))
        else:
            if not 0 <= args.line < len(runs):
                raise UserError(f"--line {args.line}: {args.sweep_file} has runs 0..{len(runs) - 1}")
            print(shlex.join(runs[args.line].command_argv(args.root)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
