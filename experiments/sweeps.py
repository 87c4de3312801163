"""Sweep files: a readable list of runs, one line each.

Format (see experiments/smca_table.sweep)::

    # comment (also after flags)
    common: --num_queries 300 --epochs 50        # flags for every run, at most one such line
    seeds: 0 1 2                                 # optional: every run once per seed, at most one such line
    focal_300_type1_no_scale --dynamic_scale type1
    focal_300_type2_smooth_4 --dynamic_scale type2 --smooth 4

A run line is ``<name> <flags...>``; the name ([A-Za-z0-9_.-]) is the run's output folder
``<root>/<name>``. A run's argv is the common flags followed by its own, so its own win (argparse keeps
the last value). Flags are split like a shell would (quotes work). ``--output_dir`` is not allowed in
the file: the launchers set it from the name.

Seeds: with a ``seeds:`` line (or a launcher's ``--seeds``, which replaces the file's list), every run
line becomes one run per seed, named ``<name>/seed<k>`` (output folder ``<root>/<name>/seed<k>``) with
``--seed k`` appended; ``--seed`` itself is then not allowed in the file. The order is seed-major: every
run with the first seed, then every run with the second, ... so a sweep cut short has whole tables for its
first seeds, and adding seeds later only appends runs (the index of every existing run stays the same).

Every run is checked against main.py's parser: an unknown flag or a bad value is a UserError naming
the file, the line and the flag.

CLI (used by slurm/sweep.sbatch)::

    python -m experiments.sweeps FILE --list             # names, one per line, in index order
    python -m experiments.sweeps FILE --count
    python -m experiments.sweeps FILE --line N [--root DIR]   # argv of run N, shell-quoted
    ... [--seeds K...]                                    # replaces the file's seeds: line
"""
import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from util.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED_FLAGS = ("--output_dir",)
SEED_FLAG = "--seed"


@dataclass(frozen=True)
class Run:
    name: str  # output folder below the root: the line's name, or '<name>/seed<k>' with seeds
    argv: list  # common flags first, then the run's own, then '--seed k' with seeds
    line: int = 0  # 1-based line number in the sweep file (for messages)
    base: str = ""  # the run line's name (without '/seed<k>')
    seed: Optional[int] = None  # the seed of an expanded run; None without seeds

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


def read_sweep(path, check=True, seeds=None):
    """The runs of a sweep file, in index order; ``check`` validates each against main.py's parser.
    ``seeds`` (a list of ints) replaces the file's ``seeds:`` line (see the module docstring)."""
    common, common_line, runs, seen = [], None, [], {}
    file_seeds, seeds_line = None, None
    for lineno, tokens in _parse_lines(path):
        head = tokens[0]
        if head.startswith("common:"):
            if common_line is not None:
                raise UserError(f"{path}:{lineno}: second 'common:' line (the first is line {common_line}); "
                                f"merge them into one")
            rest = head[len("common:"):]
            common, common_line = ([rest] if rest else []) + tokens[1:], lineno
            _check_reserved(path, lineno, common)
            continue
        if head.startswith("seeds:"):
            if seeds_line is not None:
                raise UserError(f"{path}:{lineno}: second 'seeds:' line (the first is line {seeds_line}); "
                                f"merge them into one")
            rest = head[len("seeds:"):]
            file_seeds, seeds_line = parse_seeds(([rest] if rest else []) + tokens[1:], f"{path}:{lineno}"), lineno
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
    if seeds is not None:
        seeds = parse_seeds([str(k) for k in seeds], "--seeds")
    else:
        seeds = file_seeds
    # 'common:' may come after some runs; it applies to all of them
    result = [Run(name, common + flags, lineno, base=name) for lineno, name, flags in runs]
    if seeds is not None:
        where = f"line {seeds_line}" if file_seeds is not None and seeds is file_seeds else "--seeds"
        for lineno, flags in [(common_line, common)] + [(lineno, flags) for lineno, _, flags in runs]:
            if any(flag.split("=", 1)[0] == SEED_FLAG for flag in flags):
                raise UserError(f"{path}:{lineno}: {SEED_FLAG} is set per run by the seeds ({where}); "
                                f"remove it from the line")
        result = [Run(f"{run.name}/seed{seed}", run.argv + [SEED_FLAG, str(seed)], run.line, base=run.name,
                      seed=seed) for seed in seeds for run in result]
    if check:
        parser = _strict_parser()
        if common_line is not None:
            validate(Run("common", common, common_line), path, parser)
        for run in result:
            validate(run, path, parser)
    return result


def parse_seeds(tokens, where):
    """Seeds as distinct non-negative ints, in the order given; UserError naming ``where`` otherwise."""
    if not tokens:
        raise UserError(f"{where}: no seeds given; write e.g. 'seeds: 0 1 2'")
    seeds = []
    for token in tokens:
        if not re.fullmatch(r"[0-9]+", token):
            raise UserError(f"{where}: seed {token!r} is not a non-negative integer")
        if int(token) in seeds:
            raise UserError(f"{where}: seed {int(token)} is listed twice")
        seeds.append(int(token))
    return seeds


def select(runs, only, source):
    """The runs named in ``only``: a run line's name selects all its seeds, '<name>/seed<k>' one of them."""
    names = {run.name for run in runs} | {run.base for run in runs}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise UserError(f"--only {' '.join(unknown)}: not in {source} "
                        f"(runs: {' '.join(dict.fromkeys(run.base for run in runs))})")
    return [run for run in runs if run.name in only or run.base in only]


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
    """flag_checks.check_args, except what depends on the machine: device and AMP are properties of the node
    the job lands on, so a login node without GPUs can validate a GPU run."""
    import flag_checks

    probe = argparse.Namespace(**vars(args))
    probe.device, probe.amp = "cpu", False
    flag_checks.check_args(probe)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m experiments.sweeps", description="Read a sweep file.")
    parser.add_argument("sweep_file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="run names, one per line, in index order")
    what.add_argument("--count", action="store_true", help="number of runs")
    what.add_argument("--line", type=int, metavar="N", help="argv of run N (0-based), shell-quoted")
    parser.add_argument("--root", default=None, help="with --line: append --output_dir ROOT/<name>")
    parser.add_argument("--seeds", nargs="+", default=None, metavar="K",
                        help="every run once per seed K, named <name>/seed<K> (replaces the file's seeds: line)")
    parser.add_argument("--no_check", action="store_true",
                        help="skip validation against main.py (fast; main.py checks the flags anyway)")
    return parser


def main_cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        runs = read_sweep(args.sweep_file, check=not args.no_check, seeds=args.seeds)
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
