"""Multi-scale SMCA as whole models and flags: the default model is today's (keys and outputs pinned), every
parameter of every variant combination gets a gradient, the fused route equals the explicit one within float32
bounds, checkpoints round-trip through main.py (--resume auto), load_detector and the hub, and combinations that
make no sense are refused at parse time in one line."""
import hashlib

import pytest
import torch

import main
from models import build_model
from models.criterion import weighted
from models.multiscale import LevelBias, joint_prior
import run_setup
from tests.conftest import TINY_CLI, make_args
from tests.test_fused_prior import compare, logit_error_bound
from util.errors import UserError
from util.misc import nested_tensor_from_tensor_list

pytestmark = pytest.mark.usefixtures("single_thread")

P = dict(ms_levels="16,32,64", enc_layers=5, enc_pattern="IIMII", dynamic_scale="type3")
Z = dict(ms_levels="8,16,32,64", ms_encoder="dwconv", ms_prior="per_level", dynamic_scale="type3")


def fingerprint(model):
    """(number of state-dict entries, a hash of their names and shapes, three sums of the eval outputs)."""
    keys = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = model.eval()([torch.randn(3, 70, 90, generator=g), torch.randn(3, 100, 64, generator=g)])
    sums = (out["pred_logits"].double().sum().item(), out["pred_boxes"].double().sum().item(),
            out["pred_logits"].abs().double().sum().item())
    return len(model.state_dict()), hashlib.sha256(keys.encode()).hexdigest()[:16], sums


# measured on main before multi-scale existed (commit 121fa46), same flags, seed and inputs
TODAY = {
    "detr": (161, "d04c9c21877d0ad5", (12.481992229819298, 24.33795714378357, 70.7427339553833)),
    "smca": (179, "801f35a070969255", (-548.0106875896454, 24.410243332386017, 548.0106875896454)),
}


@pytest.mark.quick
@pytest.mark.parametrize("name, flags", [("detr", {}), ("smca", dict(dynamic_scale="type2", head_mixture=True,
                                                                      query_mixture=True))])
def test_default_ms_levels_is_todays_model(name, flags):
    args = make_args(**flags)
    assert args.ms_levels == "none"
    torch.manual_seed(0)
    count, keys, sums = fingerprint(build_model(args)[0])
    assert (count, keys) == TODAY[name][:2]
    assert sums == pytest.approx(TODAY[name][2], rel=1e-6)


def padded_batch():
    g = torch.Generator().manual_seed(1)
    return nested_tensor_from_tensor_list([torch.randn(3, 96, 160, generator=g), torch.randn(3, 128, 64, generator=g)])


TARGETS = [{"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]]), "labels": torch.tensor([1])},
           {"boxes": torch.tensor([[0.3, 0.6, 0.2, 0.5], [0.7, 0.2, 0.3, 0.3]]), "labels": torch.tensor([2, 3])}]


def train_step(args, seed=0):
    """Outputs, loss and parameter gradients of one step on a batch padded both ways; the co-attention calls."""
    torch.manual_seed(seed)
    model, criterion, _ = build_model(args)
    model.train()
    calls = []
    handles = [layer.multihead_attn.register_forward_pre_hook(
        lambda m, a, kw: calls.append((m, a[0], a[1], kw["attn_bias"])), with_kwargs=True)
        for layer in model.transformer.decoder.layers]
    outputs = model(padded_batch())
    for handle in handles:
        handle.remove()
    losses = criterion(outputs, TARGETS)
    loss = sum(weighted(losses, criterion.weight_dict).values())
    loss.backward()
    results = {"pred_logits": outputs["pred_logits"].detach(), "pred_boxes": outputs["pred_boxes"].detach(),
               "loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    return model, results, calls


COMBINATIONS = [
    P,
    {**P, "dynamic_scale": "type1", "scale_select": "none"},
    {**P, "dynamic_scale": "type2", "intra_share": 0, "level_embed": 0, "head_mixture": True},
    {**P, "dynamic_scale": "type4", "ms_prior": "per_level", "query_mixture": True, "prior_impl": "explicit"},
    {**P, "enc_pattern": "MMM", "enc_layers": 3, "pre_norm": True, "cls_loss": "ce"},
    Z,
    {**Z, "dynamic_scale": "type2", "ms_prior": "shared", "scale_select": "none", "head_mixture": True,
     "query_mixture": True},
    {**Z, "ms_levels": "16,32,64", "dynamic_scale": "type4", "level_embed": 0},
    {**Z, "ms_encoder": "attn", "enc_pattern": "IIMII", "enc_layers": 5, "dynamic_scale": "type1"},
]


@pytest.mark.parametrize("flags", COMBINATIONS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()
                                                                         if k not in ("enc_layers",)))
def test_every_parameter_gets_a_gradient(flags):
    model, results, calls = train_step(make_args(**flags))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(results))
    assert not missing, missing
    assert all(results[n].abs().sum() > 0 for n in trainable if ".scale_select." in n or "level_embed" in n)
    bias = calls[0][3]
    assert isinstance(bias, LevelBias) and len(bias.priors) == len(flags["ms_levels"].split(","))
    assert (bias.alpha is None) == (flags.get("scale_select") == "none")
    has_select = any(".scale_select." in n for n in trainable)
    assert has_select == (flags.get("scale_select", "softmax") == "softmax")
    assert ("transformer.level_embed" in trainable) == bool(flags.get("level_embed", 1))


@pytest.mark.parametrize("flags", [P, {**Z, "scale_select": "none", "query_mixture": True}], ids=["P", "Z-joint"])
def test_whole_model_fused_equals_explicit(flags):
    """The bound of tests/test_fused_prior.py per decoder layer and level (largest), doubled per decoder layer."""
    results = {}
    for route in ("explicit", "fused"):
        args = make_args(dropout=0.0, prior_impl=route, **flags)
        _, results[route], calls = train_step(args)
    bounds = []
    for module, query, key, bias in calls:
        keys = key.split(bias.sizes) if bias.alpha is not None else [key]
        priors = bias.priors if bias.alpha is not None else [joint_prior(bias.priors)]
        bounds += [logit_error_bound(module, query, k, p) for k, p in zip(keys, priors)]
    eps = 2 ** args.dec_layers * max(bounds)
    assert eps < 5e-3
    assert set(results["fused"]) == set(results["explicit"])
    for name, value in results["explicit"].items():
        compare(results["fused"][name], value, eps, name)


# --- parse-time refusals ------------------------------------------------------------------------------------------

@pytest.mark.quick
@pytest.mark.parametrize("flags, named", [
    (dict(ms_encoder="dwconv"), "--ms_encoder dwconv configures multi-scale"),
    (dict(enc_pattern="IIMII", enc_layers=5), "--enc_pattern"),
    (dict(scale_select="none"), "--scale_select"),
    (dict(ms_prior="per_level", dynamic_scale="type2"), "--ms_prior"),
    (dict(intra_share=0), "--intra_share"),
    (dict(level_embed=0), "--level_embed"),
    (dict(ms_levels="16,32,64"), "--dynamic_scale type1"),
    (dict(P, backbone="resnet50", dilation=True), "--dilation"),
    (dict(P, masks=True), "--masks"),
    (dict(P, position_embedding="learned"), "--position_embedding"),
    (dict(P, enc_layers=6), "pass --enc_layers 5"),
    (dict(P, enc_pattern="IIXII"), "letters of IM"),
    (dict(Z, enc_pattern="IIIIII"), "--ms_encoder dwconv has none"),
    (dict(Z, intra_share=0), "--intra_share 0"),
    (dict(Z, pre_norm=True), "--pre_norm"),
    (dict(P, enc_pattern="MMMMM", intra_share=0), "has none"),
])
def test_nonsense_combinations_are_refused_in_one_line(flags, named):
    with pytest.raises(UserError, match=named) as info:
        make_args(**flags)
    assert "\n" not in str(info.value)


def test_flags_are_architecture_flags():
    from options import ARCH_FLAGS
    assert {"ms_levels", "ms_encoder", "enc_pattern", "intra_share", "level_embed", "scale_select",
            "ms_prior"} <= set(ARCH_FLAGS)


# --- checkpoints: main.py, --resume auto, load_detector, the hub ---------------------------------------------------

def run_main(argv):
    parser = main.get_args_parser()
    args = parser.parse_args(argv)
    run_setup.resolve_args(args)
    from rundir.run_config import explicit_flags
    return main.main(args, explicit_flags(parser, argv))


def test_checkpoint_round_trip_resume_load_detector_and_hub(tmp_path):
    import hubconf
    from inference import load_detector

    common = [*TINY_CLI, "--synthetic_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run")]
    ms = ["--ms_levels", "16,32,64", "--enc_layers", "3", "--enc_pattern", "IMI", "--dynamic_scale", "type2",
          "--ms_prior", "per_level", "--intra_share", "0"]
    run_main([*common, *ms, "--epochs", "1"])
    path = tmp_path / "run" / "checkpoint.pth"
    first = torch.load(path, map_location="cpu", weights_only=False)
    assert first["config"]["ms_levels"] == "16,32,64" and first["config"]["enc_pattern"] == "IMI"
    run_main([*common, "--enc_layers", "3", "--epochs", "2", "--resume", "auto"])  # the rest from the checkpoint
    second = torch.load(path, map_location="cpu", weights_only=False)
    assert second["epoch"] == first["epoch"] + 1 and second["config"]["ms_prior"] == "per_level"
    assert set(second["model"]) == set(first["model"])
    assert any(k.startswith("transformer.encoder.layers.0.2.") for k in second["model"])  # unshared I blocks

    detector = load_detector(str(path))
    assert detector.config["ms_levels"] == "16,32,64" and "multi-scale" in detector.describe()
    args = make_args(**{k.lstrip("-"): v for k, v in zip(ms[::2], ms[1::2])}, num_queries=10, num_classes=5,
                     dim_feedforward=64)
    model = build_model(args)[0].eval()
    model.load_state_dict(second["model"], strict=True)
    hub = hubconf.smca_resnet50(checkpoint=str(path), backbone_weights="none")
    images = padded_batch()
    with torch.no_grad():
        expected = model(images)
        for other in (detector.model, hub):
            got = other(images)
            torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=0)
            torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)


def test_parameter_counts_match_the_spec_and_the_zips_log():
    """R50, 300 queries, FFN 1024, type3, COCO's 91 ids (meta tensors: no memory). The spec estimates P at 39.43 M
    (39.53 M per_level); Z with 6 encoder layers has exactly the n_parameters logged by the zip's 44.4 AP run."""
    from models import build_detr

    def trainable(**flags):
        with torch.device("meta"):
            model = build_detr(backbone="resnet50", num_queries=300, num_classes=91, dim_feedforward=1024,
                               dynamic_scale="type3", **flags)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    p = dict(ms_levels="16,32,64", enc_layers=5, enc_pattern="IIMII")
    assert round(trainable(**p) / 1e6, 2) == 39.43
    assert round(trainable(**p, ms_prior="per_level") / 1e6, 2) == 39.53
    assert trainable(ms_levels="8,16,32,64", ms_encoder="dwconv", ms_prior="per_level", enc_layers=6) == 40_763_514
