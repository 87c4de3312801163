"""Every command line answers --help and flag errors before torch is imported (a login node, a loaded machine:
torch and the models cost seconds of CPU), and the names the torch-free parser offers agree with the code."""
import subprocess
import sys

import pytest

from tests.cli import CAP_S, REPO

# runs a script as `python SCRIPT ARGS...` would, then reports whether torch got imported
PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(sys.argv[0])))
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
print(f"exit {code} torch {'torch' in sys.modules}", file=sys.stderr)
"""


def probe(*argv):
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=CAP_S)
    return result.stdout, result.stderr


@pytest.mark.quick
@pytest.mark.parametrize("argv, code", [
    (["main.py", "--help"], 0),
    (["main.py", "--lr", "fast"], 2),
    (["main.py", "--no_such_flag"], 2),
    (["main.py", "--eval"], 2),
    (["predict.py", "--help"], 0),
    (["slurm/sweep.py", "--help"], 0),
    (["slurm/submit.py", "--help"], 0),
    (["experiments/compare.py", "--help"], 0),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_help_and_flag_errors_answer_before_torch_is_imported(argv, code):
    stdout, stderr = probe(*argv)
    assert stderr.splitlines()[-1] == f"exit {code} torch False", stderr[-3000:]
    if code == 0:
        assert "usage:" in stdout


def test_the_parsers_names_agree_with_the_code():
    import datasets
    import options
    from datasets.coco_eval import COCO_BACKENDS

    assert options.DATASET_NAMES == datasets.DATASETS
    assert options.COCO_BACKEND_NAMES == COCO_BACKENDS


def main_error(argv, capsys):
    import flag_checks

    with pytest.raises(SystemExit) as exit:
        flag_checks.parse_main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


@pytest.mark.quick
def test_an_unknown_flag_gets_the_closest_flag_names(capsys):
    assert main_error(["--lr_drops", "3", "--num_querie", "5"], capsys) == (
        "error: unrecognized arguments: --lr_drops 3 --num_querie 5; --lr_drops: did you mean --lr_drop?; "
        "--num_querie: did you mean --num_queries? (python main.py --help lists the flags)\n")


def test_names_of_the_smca_code_are_refused_naming_the_real_flag(capsys):
    import options

    flags = {o for action in options.main_parser()._actions for o in action.option_strings}
    for alias, real in options.ALIASES.items():
        assert real.split()[0] in flags and alias not in flags
        assert main_error([f"{alias}=1" if alias == "--beta" else alias], capsys) == (
            f"error: unrecognized arguments: {alias}{'=1' if alias == '--beta' else ''}; the SMCA code's {alias} is "
            f"{real} here (python main.py --help lists the flags)\n")
