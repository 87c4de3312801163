"""--channels_last (models/acceleration.py): the ResNet trunk and its input in channels-last memory format give the
default's outputs and gradients within float32 rounding, keep the weights' names and values, and a run trains
and evaluates with it.

Bounds: float32 convolutions in NHWC sum in another order than in NCHW. Outputs: atol 1e-5 / rtol 1e-4.
Gradients: |grad - reference| / |reference| per parameter tensor below 2e-4; measured on these tiny random
models 3e-6 to 7e-6 with frozen BatchNorm and 5e-5 with trainable BatchNorm in training mode (its batch
statistics sum over the whole batch). A wrong layout (a transposed or mixed-up channel) changes outputs at the
1e-1 scale."""
import copy

import pytest
import torch

import flag_checks
import main
from models import build_model
from models.criterion import weighted
from models.acceleration import to_channels_last
from util.misc import nested_tensor_from_tensor_list

OUTPUT_TOL = {"atol": 1e-5, "rtol": 1e-4}
GRAD_REL_NORM = 2e-4  # |grad - reference| / |reference| per parameter tensor


def _batch(num_classes: int):
    """Two images of different sizes (so the padded one has a mask) and their targets."""
    generator = torch.Generator().manual_seed(1)
    images = nested_tensor_from_tensor_list([torch.randn(3, 96, 128, generator=generator),
                                             torch.randn(3, 80, 112, generator=generator)])
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[0.4, 0.4, 0.5, 0.3]]), "labels": torch.tensor([num_classes - 1])}]
    return images, targets


def _loss_and_grads(model, criterion, images, targets):
    outputs = model(images)
    losses = criterion(outputs, targets)
    loss = sum(weighted(losses, criterion.weight_dict).values())
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


@pytest.mark.quick
def test_trunk_weights_and_input_become_channels_last_with_the_same_values(tiny_args):
    args = tiny_args(dynamic_scale="type2")
    model, _, _ = build_model(args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model.backbone[0].body.conv1.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    assert to_channels_last(model) == 1
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    conv = model.backbone[0].body.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model.input_proj.weight.is_contiguous()  # outside the trunk: unchanged
    model.eval()
    with torch.no_grad():
        model(_batch(args.num_classes)[0])
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()


@pytest.mark.parametrize("flags", [{"dynamic_scale": "none"}, {"dynamic_scale": "type4", "query_mixture": True},
                                   {"dynamic_scale": "type2", "backbone_norm": "batch"}],
                         ids=["detr", "type4_query_mixture", "type2_batchnorm"])
def test_outputs_and_gradients_equal_the_default_within_float32_rounding(tiny_args, flags):
    args = tiny_args(dropout=0.0, **flags)
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    fast = copy.deepcopy(model)
    to_channels_last(fast)
    images, targets = _batch(args.num_classes)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(fast, mode)()
        reference, reference_grads = _loss_and_grads(model, criterion, images, targets)
        outputs, grads = _loss_and_grads(fast, criterion, images, targets)
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(outputs[key], reference[key], **OUTPUT_TOL)
        assert grads.keys() == reference_grads.keys() and len(grads) > 20
        errors = {name: float((grads[name] - grad).norm() / grad.norm()) for name, grad in reference_grads.items()}
        assert max(errors.values()) < GRAD_REL_NORM, errors
    # a layout mistake would be far outside the bounds: one transposed image changes the outputs by much more
    with torch.no_grad():
        wrong = model(nested_tensor_from_tensor_list([images.tensors[0].transpose(1, 2)[:, :96, :96]]))
    assert (wrong["pred_boxes"][0] - reference["pred_boxes"][0]).abs().max() > 100 * OUTPUT_TOL["atol"]


def test_a_run_trains_and_evaluates_with_channels_last(tmp_path, cli_synthetic_root):
    """One epoch of the tiny CLI run, in process, with --channels_last: it trains, evaluates and saves weights
    that load into a default model."""
    from tests.conftest import TINY_CLI

    out = tmp_path / "run"
    args = flag_checks.parse_main([*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "1", "--eval_every", "1",
                            "--output_dir", str(out), "--channels_last"])
    stats = main.main(args)
    assert "coco_eval_bbox" in stats
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    model, _, _ = build_model(args)
    model.load_state_dict(state)
    assert model.backbone[0].body.conv1.weight.is_contiguous()
