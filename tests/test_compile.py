"""--compile (models/acceleration.py): torch.compile of the model with dynamic shapes gives eager's outputs and
gradients for DETR and every SMCA variant on the fused route, compiles once for batches of different image sizes,
and refuses at parse time what it does not handle.

Backend: the tests compile with ``aot_eager``: TorchDynamo's graph capture (with dynamic shapes) and AOTAutograd's
forward/backward graphs, the same as ``inductor`` up to inductor's code generation, which needs minutes of C++
compilation per model on a small CPU (docs/training-and-run-folders.md, "Speed flags"). Bounds: outputs atol 1e-5
/ rtol 1e-4; gradients |grad - eager| / |eager| per parameter tensor below 1e-5 (AOTAutograd's decompositions
may sum in another order; measured: see the docs page).
"""
import copy

import pytest
import torch

import flag_checks
import main
from experiments.benchmark_common import VARIANTS
from models import build_model
from models.criterion import weighted
from models.acceleration import compile_counts, compile_module
from options import COMPILE_REFUSED
from util.misc import nested_tensor_from_tensor_list

BACKEND = "aot_eager"
OUTPUT_TOL = {"atol": 1e-5, "rtol": 1e-4}
GRAD_REL_NORM = 1e-5
SIZES = ((96, 128), (64, 96))  # two batches of different padded sizes: dynamic shapes must not recompile


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _batch(height: int, width: int, num_classes: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = nested_tensor_from_tensor_list([torch.randn(3, height, width, generator=generator),
                                             torch.randn(3, height - 16, width - 32, generator=generator)])
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[0.4, 0.4, 0.5, 0.3]]), "labels": torch.tensor([num_classes - 1])}]
    return images, targets


def _step(model, criterion, images, targets, module=None):
    """Outputs and gradients; ``module``: the uncompiled module holding the parameters (default: ``model``)."""
    module = module or model
    outputs = model(images)
    losses = criterion(outputs, targets)
    loss = sum(weighted(losses, criterion.weight_dict).values())
    module.zero_grad(set_to_none=True)
    loss.backward()
    return outputs, {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _flags(variant: str) -> dict:
    flags, names = {}, VARIANTS[variant]
    for index, name in enumerate(names):
        if name.startswith("--"):
            value = names[index + 1] if index + 1 < len(names) and not names[index + 1].startswith("--") else True
            flags[name[2:]] = value
    return flags


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_equals_eager_and_compiles_once(tiny_args, variant):
    args = tiny_args(dropout=0.0, dec_layers=1, prior_impl="fused", **_flags(variant))
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    copied = copy.deepcopy(model)
    compiled = compile_module(copied, BACKEND)
    model.train()
    compiled.train()
    for seed, (height, width) in enumerate(SIZES):
        images, targets = _batch(height, width, args.num_classes, seed)
        reference, reference_grads = _step(model, criterion, images, targets)
        outputs, grads = _step(compiled, criterion, images, targets, module=copied)
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(outputs[key], reference[key], **OUTPUT_TOL)
        assert grads.keys() == reference_grads.keys() and len(grads) > 20
        errors = {name: float((grads[name] - grad).norm() / grad.norm().clamp_min(1e-30))
                  for name, grad in reference_grads.items()}
        assert max(errors.values()) < GRAD_REL_NORM, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert compile_counts() == {"frames": 1, "graphs": 1, "graph_breaks": 0}


@pytest.mark.quick
def test_parse_time_refusals(capsys):
    args = flag_checks.parse_main(["--compile", "--fixed_size", "512", "--device", "cpu"])
    assert args.compile == "inductor" and not args.channels_last
    assert flag_checks.parse_main(["--compile", "aot_eager", "--device", "cpu"]).compile == "aot_eager"
    assert flag_checks.parse_main(["--device", "cpu"]).compile is None
    assert flag_checks.parse_main(["--compile", "--eval", "--eval_untrained", "--device", "cpu"]).compile == "inductor"
    refused = [(["--compile", "--dynamic_scale", "type2", "--ms_levels", "16,32,64"], "--compile with --ms_levels:"),
               (["--compile", "tvm"], "--compile: invalid choice: 'tvm'"),
               (["--compile"], "--compile inductor compiles the training step again for every feature-map size")]
    assert set(COMPILE_REFUSED) == {"ms_levels"}
    for argv, message in refused:
        with pytest.raises(SystemExit) as exit_info:
            flag_checks.parse_main([*argv, "--device", "cpu"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_one_epoch_run_compiles_twice_and_reports_it(tmp_path, cli_synthetic_root, capsys):
    """The tiny CLI run (randomly resized 64-px images, 2 training steps, evaluation of 4 images) with --compile
    (backend eager: TorchDynamo's capture alone, the part that decides recompilations): one frame for training,
    one for evaluation (eval mode and no_grad are other guards), no graph break; main prints the counts last,
    and the checkpoint holds the uncompiled names."""
    from tests.conftest import TINY_CLI

    out = tmp_path / "run"
    args = flag_checks.parse_main([*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "1", "--eval_every", "1",
                            "--dynamic_scale", "type2", "--output_dir", str(out), "--compile", "eager"])
    assert "coco_eval_bbox" in main.main(args)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "torch.compile: 2 frame compilations, 2 graphs, 0 graph breaks"
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    assert not any(name.startswith("_orig_mod.") for name in state)
