"""pyproject.toml: its pins are requirements.txt's and requirements-export.txt's, it lists every top-level module and
package of the clone, and a wheel built from it offline (pip wheel --no-build-isolation --no-index, with the
setuptools of this venv) holds them and declares the same requirements and extras."""
import email
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# folders at the top level that are not part of the package: the tests, shell scripts, documentation
NOT_PACKAGED = {"tests", "scripts", "docs"}


def pins(path: Path) -> dict:
    """{normalised name: 'name==version'} of a requirements file (comments and blank lines skipped)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {normalised(line): line for line in lines if line}


def normalised(requirement: str) -> str:
    return re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def as_pins(requirements) -> dict:
    return {normalised(r): r for r in requirements}


@pytest.mark.quick
def test_pins_are_those_of_the_requirements_files():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    assert {**as_pins(project["dependencies"]), **as_pins(extras["test"])} == pins(ROOT / "requirements.txt")
    assert as_pins(extras["export"]) == pins(ROOT / "requirements-export.txt")
    assert set(as_pins(extras["export"])) == {"onnx", "onnxscript", "onnxruntime"}
    assert all("==" in r for r in project["dependencies"] + extras["test"] + extras["export"])


def test_every_top_level_module_and_package_is_listed():
    setuptools = PYPROJECT["tool"]["setuptools"]
    modules = {p.stem for p in ROOT.glob("*.py")}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_PACKAGED
    assert set(setuptools["py-modules"]) == modules
    assert set(setuptools["packages"]) == packages
    assert {"main", "engine", "options", "predict", "hubconf", "inference", "export"} <= modules
    assert {"models", "datasets", "util", "experiments", "slurm"} <= packages


def test_an_offline_wheel_holds_the_layout_and_the_metadata(tmp_path):
    pytest.importorskip("setuptools", reason="the offline build uses this venv's setuptools")
    source = tmp_path / "src"
    source.mkdir()
    setuptools = PYPROJECT["tool"]["setuptools"]
    for name in ("pyproject.toml", "README.md", *(f"{m}.py" for m in setuptools["py-modules"])):
        shutil.copy(ROOT / name, source / name)
    for package in setuptools["packages"]:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("smca_detr-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
    assert {f"{m}.py" for m in setuptools["py-modules"]} <= names
    assert {"models/detr.py", "util/misc.py", "datasets/coco.py", "experiments/benchmark.py",
            "slurm/submit.py", "experiments/smca_table.sweep", "slurm/train.sbatch"} <= names
    requires = metadata.get_all("Requires-Dist")
    plain = [r for r in requires if "extra ==" not in r]
    export = [r.split(";")[0].strip() for r in requires if "extra == \"export\"" in r]
    assert as_pins(plain) == as_pins(PYPROJECT["project"]["dependencies"])
    assert as_pins(export) == pins(ROOT / "requirements-export.txt")
    assert set(metadata.get_all("Provides-Extra")) == {"test", "export"}
