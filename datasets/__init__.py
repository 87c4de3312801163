"""Datasets: the builders (datasets/build.py, where the args namespace is read and nowhere below), loaders,
transforms and evaluation.

The package itself imports nothing: the builders' names (``datasets.build_dataset`` ...) load torch on first
use, so ``python -m datasets.check`` (the annotation check, docs/data-checks.md) starts without it."""
import importlib
from pathlib import Path


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if (Path(__file__).parent / f"{name}.py").is_file():  # a submodule (also what `from . import x` asks for)
        return importlib.import_module(f"{__name__}.{name}")
    build = importlib.import_module(f"{__name__}.build")
    try:
        value = getattr(build, name)
    except AttributeError:
        raise AttributeError(f"module 'datasets' has no attribute {name!r}") from None
    globals()[name] = value
    return value
