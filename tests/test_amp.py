"""bf16 autocast (--amp): the spatial prior stays float32 and results stay close to float32.

CI has no GPU; CPU autocast to bfloat16 exercises the same code path (engine._autocast uses the device type)."""
import torch

from engine import _autocast
from models import build_model
from util.misc import nested_tensor_from_tensor_list


def test_bf16_autocast_keeps_prior_fp32_and_outputs_close(tiny_args):
    args = tiny_args(dynamic_scale="type4", query_mixture=True, dropout=0.0, hidden_dim=64, nheads=4)
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    model.eval()
    images = nested_tensor_from_tensor_list([torch.randn(3, 128, 160), torch.randn(3, 96, 128)])
    reference = model(images)
    priors = []
    hook = model.transformer.decoder.priors[-1].register_forward_hook(lambda m, i, o: priors.append(o))
    with _autocast(torch.device("cpu"), amp=True):
        mixed = model(images)
    hook.remove()
    assert priors[0].dtype == torch.float32  # G computed outside autocast
    assert torch.isfinite(mixed["pred_logits"]).all()
    torch.testing.assert_close(mixed["pred_boxes"].float(), reference["pred_boxes"], atol=1e-2, rtol=0)
    torch.testing.assert_close(mixed["pred_logits"].float(), reference["pred_logits"], atol=0.1, rtol=0)


def test_amp_off_is_the_plain_forward(tiny_args):
    args = tiny_args(dynamic_scale="type2", dropout=0.0)
    model, _, _ = build_model(args)
    model.eval()
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 96)])
    with _autocast(torch.device("cpu"), amp=False):
        off = model(images)
    plain = model(images)
    assert torch.equal(off["pred_logits"], plain["pred_logits"]) and off["pred_logits"].dtype == torch.float32
