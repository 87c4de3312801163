"""Every run of every sweep file in experiments/ parses with main.py's flags and builds its model."""
from pathlib import Path

import pytest
import torch

import main
from experiments import sweeps
from models import build_model
import run_setup

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.sweep"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
@pytest.mark.quick
def test_every_run_builds_its_model(path, single_thread):
    runs = sweeps.read_sweep(path)
    assert runs
    for run in runs:
        args = main.get_args_parser().parse_args(run.argv + ["--device", "cpu", "--num_classes", "91"])
        run_setup.resolve_args(args)
        with torch.device("meta"):  # shapes and modules only, no memory or init cost
            model, criterion, _ = build_model(args)
        assert model.num_queries == args.num_queries
        assert hasattr(model.transformer.decoder, "priors") == (args.dynamic_scale != "none")
        assert criterion.weight_dict["loss_ce"] == (2.0 if args.cls_loss == "focal" else 1.0)
