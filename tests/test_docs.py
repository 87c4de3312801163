"""The README and docs/*.md stay true to the code: every `--flag` they write exists in the parser of the command it
belongs to, and every relative link, anchor and picture points at something that exists.

Flags are read from code blocks and inline code. A flag belongs to the command written before it on its line (a
code block's line, with its backslash continuations) or in its inline code span: ``python main.py ... --x`` is
main.py's, ``python slurm/sweep.py ... -- --x`` is main.py's again (after ``--``), ``sbatch slurm/train.sbatch
--x`` is main.py's (the script passes it on). Flags of other programs (srun, sbatch, torchrun, tensorboard, pip,
...) are not checked. A flag with no command in front of it (``--dynamic_scale`` in a sentence) must be a flag of
some command of this project, unless its paragraph talks about one of those other programs.
"""
import importlib
import re
from functools import lru_cache
from pathlib import Path

import pytest

import options
from experiments.benchmark import DEFAULT_MODE as BENCHMARK_DEFAULT_MODE, MODES as BENCHMARK_MODULES

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])

# command -> how to get its parser: (module, function); a function returning a parser
PARSERS = {
    "main": ("options", "main_parser"),
    "predict": ("predict", "get_args_parser"),
    "submit": ("slurm.submit", "get_parser"),
    "sweep": ("slurm.sweep", "get_parser"),
    "status": ("slurm.status", "get_parser"),
    "compare": ("experiments.compare", "get_args_parser"),
    "plot_logs": ("experiments.plot_logs", "get_args_parser"),
    "sweeps": ("experiments.sweeps", "get_args_parser"),
    "prior_precision": ("experiments.prior_precision", "get_args_parser"),
    **{f"benchmark {mode}": (module, "get_args_parser") for mode, module in BENCHMARK_MODULES.items()},
    "export": ("export", "get_args_parser"),
    "check": ("datasets.check", "get_args_parser"),
}
# commands whose own flags end at '--': what follows is main.py's
MAIN_AFTER_DASHES = {"submit", "sweep", "status", *(f"benchmark {mode}" for mode in BENCHMARK_MODULES)}
# how a command is written -> the command; scripts that pass their arguments on to main.py count as main.py
PROGRAMS = {
    "main.py": "main", "predict.py": "predict", "export.py": "export", "datasets.check": "check", "slurm/submit.py": "submit", "slurm.submit": "submit",
    "slurm/sweep.py": "sweep", "slurm.sweep": "sweep", "slurm/status.py": "status", "slurm.status": "status",
    "experiments/compare.py": "compare", "compare.py": "compare", "experiments.compare": "compare",
    "experiments/plot_logs.py": "plot_logs", "plot_logs.py": "plot_logs", "experiments.plot_logs": "plot_logs",
    "experiments.sweeps": "sweeps", "experiments/sweeps.py": "sweeps",
    "experiments.prior_precision": "prior_precision",
    "experiments.benchmark": "benchmark", "experiments/benchmark.py": "benchmark",
    "slurm/train.sbatch": "main", "slurm/sweep.sbatch": "main", "scripts/demo.sh": "demo.sh",
    "scripts/demo_panoptic.sh": "main", "scripts/test.sh": "test.sh",
}
TEST_SH_FLAGS = {"--quick"}  # scripts/test.sh's own flag; the rest goes to pytest
DEMO_SH_FLAGS = {"--quick"}  # scripts/demo.sh's own flag; the rest goes to main.py
# programs that are not this project's: their flags are theirs (a project program after them takes over)
EXTERNAL = {"srun", "sbatch", "torchrun", "tensorboard", "pip", "scontrol", "pytest", "torch.distributed.launch",
            "git", "apt-get", "export", "squeue", "scancel", "sinfo", "nvidia-smi", "cp", "ls", "seq"}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*\*?")  # `--train_*`: any flag starting so
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(`+)(.+?)\1", re.DOTALL)  # a span may wrap onto the next line
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@lru_cache(maxsize=None)
def known_flags(command: str) -> frozenset:
    if command == "test.sh":
        return frozenset(TEST_SH_FLAGS)
    if command == "demo.sh":
        return known_flags("main") | DEMO_SH_FLAGS
    module, function = PARSERS[command]
    parser = getattr(importlib.import_module(module), function)()
    return frozenset(option for action in parser._actions for option in action.option_strings)


def all_project_flags() -> frozenset:
    return frozenset().union(*(known_flags(command) for command in PARSERS), TEST_SH_FLAGS, DEMO_SH_FLAGS)


def blocks(text: str):
    """(kind, first line number, text) for each code block ('block') and each paragraph ('prose') of a page."""
    found, lines, i = [], text.split("\n"), 0
    paragraph, start = [], 1
    while i < len(lines):
        if FENCE.match(lines[i]):
            if paragraph:
                found.append(("prose", start, "\n".join(paragraph)))
                paragraph = []
            fence, body, first = FENCE.match(lines[i]).group(1), [], i + 2
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i])
                i += 1
            found.append(("block", first, "\n".join(body)))
        elif not lines[i].strip():
            if paragraph:
                found.append(("prose", start, "\n".join(paragraph)))
            paragraph = []
        else:
            if not paragraph:
                start = i + 1
            paragraph.append(lines[i])
        i += 1
    if paragraph:
        found.append(("prose", start, "\n".join(paragraph)))
    return found


def command_lines(kind: str, start: int, text: str):
    """(line number, text) of each command in a block (continuations joined, comments dropped) or each inline code
    span of a paragraph."""
    if kind == "prose":
        for match in INLINE.finditer(text):
            yield start + text[:match.start()].count("\n"), match.group(2)
        return
    joined, first = "", None
    for offset, line in enumerate(text.split("\n")):
        line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment (also a sweep file's)
        first = start + offset if first is None else first
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        yield first, joined + line
        joined, first = "", None
    if joined:
        yield first, joined


def flags_by_command(text: str):
    """[(flag, command or None, external)] of one command line, following the commands written on it."""
    tokens = re.split(r"\s+|(\$\(|\)|;|&&|\|\||\|)", text)
    found, stack = [], [[None, False]]  # per nesting level: [command, external]
    previous = ""
    for token in filter(None, tokens):
        state = stack[-1]
        if token == "$(":
            stack.append([None, False])
            continue
        if token == ")" and len(stack) > 1:
            stack.pop()
            continue
        if token in (";", "&&", "||", "|", "do", "then"):
            state[:] = [None, False]
            continue
        word = token.strip("[](){},'\"")
        program = PROGRAMS.get(word) or PROGRAMS.get(word.removeprefix("./")) or unknown_script(word, previous)
        if program == "benchmark":
            state[:] = [f"benchmark {BENCHMARK_DEFAULT_MODE}", False]
        elif program:
            state[:] = [program, False]
        elif word in EXTERNAL:
            state[:] = [None, True]
        elif state[0] and state[0].startswith("benchmark") and word in BENCHMARK_MODULES and previous in (
                "experiments.benchmark", "experiments/benchmark.py"):
            state[0] = f"benchmark {word}"
        elif token == "--" and state[0] in MAIN_AFTER_DASHES:
            state[0] = "main"
        else:
            for flag in FLAG.findall(token):
                found.append((flag, state[0], state[1]))
        previous = word
    return found


def unknown_script(word: str, previous: str):
    """'unknown <name>' for a script or module of this project that PROGRAMS does not know, so that its flags
    fail with a pointer here instead of passing unchecked."""
    path = word.replace(".", "/") + ".py" if previous == "-m" else word
    if path.endswith(".py") and (REPO / path).is_file():
        return f"unknown {word}"
    return None


def has_flag(flags: frozenset, flag: str) -> bool:
    return any(f.startswith(flag[:-1]) for f in flags) if flag.endswith("*") else flag in flags


def near_external_program(paragraph: str) -> bool:
    return any(re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w/-])", paragraph) for name in EXTERNAL)


def stale_flags(page: Path, root: Path = REPO) -> list[str]:
    problems = []
    name = page.relative_to(root)
    for kind, start, text in blocks(page.read_text()):
        for line, command_text in command_lines(kind, start, text):
            for flag, command, external in flags_by_command(command_text):
                if external:
                    continue
                if command is not None and command.startswith("unknown "):
                    problems.append(f"{name}:{line}: {flag} belongs to {command.split()[1]}, whose parser "
                                    f"tests/test_docs.py does not know: add it to PARSERS and PROGRAMS")
                elif command == "test.sh" and flag not in TEST_SH_FLAGS:
                    continue  # scripts/test.sh passes every other argument to pytest, an external program
                elif command is not None:
                    if not has_flag(known_flags(command), flag):
                        problems.append(f"{name}:{line}: {flag} is not a flag of {command} ({command_text.strip()})")
                elif (not has_flag(all_project_flags(), flag) and flag not in options.ALIASES
                      and not near_external_program(text)):  # an alias is named only to say it is refused
                    problems.append(f"{name}:{line}: {flag} is no flag of any command of this project")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, counts = set(), {}
    for kind, _, text in blocks(page.read_text()):
        if kind != "prose":
            continue
        for line in text.split("\n"):
            heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if heading:
                base = slug(heading.group(1))
                found.add(base if base not in counts else f"{base}-{counts[base]}")
                counts[base] = counts.get(base, 0) + 1
    return found


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    problems = []
    name = page.relative_to(root)
    for kind, start, text in blocks(page.read_text()):
        if kind != "prose":
            continue
        prose = INLINE.sub(lambda m: " " * len(m.group(0)), text)  # links inside inline code are code
        for match in LINK.finditer(prose):
            target = match.group(1)
            line = start + prose[:match.start()].count("\n")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                problems.append(f"{name}:{line}: {target}: {path} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{name}:{line}: {target}: no heading '#{anchor}' in {resolved.relative_to(root)}")
    return problems


@pytest.mark.quick
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_pictures_exist(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
@pytest.mark.quick
def test_flags_exist(page):
    assert stale_flags(page) == []


def test_flags_are_attributed_to_their_command():
    line = ("N=$(python -m experiments.sweeps F --count); srun --gres=gpu:4 python main.py --dynamic_scale type2 "
            "$(python -m experiments.sweeps F --line 0 --root r) --resume auto")
    assert flags_by_command(line) == [("--count", "sweeps", False), ("--gres", None, True),
                                      ("--dynamic_scale", "main", False), ("--line", "sweeps", False),
                                      ("--root", "sweeps", False), ("--resume", "main", False)]
    line = "python slurm/sweep.py S --root R --dry_run -- --coco_path /data/coco"
    assert [(f, c) for f, c, _ in flags_by_command(line)] == [("--root", "sweep"), ("--dry_run", "sweep"),
                                                             ("--coco_path", "main")]
    line = "torchrun --nproc_per_node=8 main.py --coco_path C"
    assert flags_by_command(line) == [("--nproc_per_node", None, True), ("--coco_path", "main", False)]
    line = "python hubconf.py --x"
    assert flags_by_command(line) == [("--x", "unknown hubconf.py", False)]
    line = "python -m experiments.benchmark coattn --threads 1 -- --cls_loss focal"
    assert [(f, c) for f, c, _ in flags_by_command(line)] == [("--threads", "benchmark coattn"),
                                                             ("--cls_loss", "main")]


@pytest.mark.quick
def test_a_renamed_flag_or_a_moved_page_fails(tmp_path):
    """The checks catch what they are for: a flag main.py no longer has, a flag given to the wrong command, a
    link to a page or heading that moved."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n```bash\npython main.py --dynamic_scale type2 --query_mixtures\n"
                    "python experiments/compare.py runs --metric AP --coco_path x\n```\n\n"
                    "Use `--smoothing 4` (not `--smooth`), see [there](missing.md) and [here](#title), [x](#gone).\n")
    problems = [p.split(": ", 1)[1] for p in stale_flags(page, tmp_path)]
    assert problems == ["--query_mixtures is not a flag of main (python main.py --dynamic_scale type2 "
                        "--query_mixtures)",
                        "--coco_path is not a flag of compare (python experiments/compare.py runs --metric AP "
                        "--coco_path x)",
                        "--smoothing is no flag of any command of this project"]
    assert [p.split(": ", 1)[1] for p in broken_links(page, tmp_path)] == [
        "missing.md: missing.md does not exist", "#gone: no heading '#gone' in page.md"]

