"""The fused prior route (G as extra q/k dims) against the explicit one (G as an additive mask).

Float64: the factors multiply out to G exactly (up to float64 rounding). Float32: the co-attention's outputs
and every gradient agree within a bound derived from float32 rounding (see ``tolerance``), for every scale
type, each mixture and both, --smooth 4, odd grids padded in x and in y, and a batch of one against a batch
of two; then whole models (forward, loss, backward), including DC5.
"""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models import build_model
from models.criterion import weighted
from models.attention import FactoredPrior, ModulatedCrossAttention
from models.spatial_prior import MLP, SCALES, CoupledPolynomial, SpatialPrior, lagrange_basis, mixture_mask
from util.misc import nested_tensor_from_tensor_list

pytestmark = pytest.mark.usefixtures("single_thread")

U32 = 2.0 ** -24  # float32 unit roundoff
U64 = 2.0 ** -53
D_MODEL, NHEAD, QUERIES = 32, 4, 7
HEIGHT, WIDTH = 5, 7  # odd grid; image 0 is padded below, image 1 on the right
EXTENTS = torch.tensor([[7.0, 3.0], [4.0, 5.0]])  # unpadded (w, h) cells per image
MIXTURES = [(False, False), (True, False), (False, True), (True, True)]  # (head, query)


def padding_mask(extents, height, width):
    """(B, H*W) True on the cells outside each image's unpadded extent."""
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    return torch.stack([((rows >= h) | (cols >= w)).flatten() for w, h in extents.int().tolist()])


class CoAttention(torch.nn.Module):
    """One SMCA co-attention as the decoder runs it: reference MLP -> centres, prior, modulated attention."""

    def __init__(self, scale_type, head_mixture=False, query_mixture=False, smooth=8.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.reference = MLP(D_MODEL, D_MODEL, 2, 3)
        self.prior = SpatialPrior(D_MODEL, NHEAD, SCALES[scale_type](D_MODEL, NHEAD), smooth,
                                  mixture_mask(QUERIES, NHEAD, head_mixture, query_mixture))
        self.attention = ModulatedCrossAttention(D_MODEL, NHEAD)
        with torch.no_grad():  # away from the start values, as after training: every term matters
            self.attention.in_proj_bias.normal_(0, 0.5)
            self.prior.norm.weight.uniform_(0.5, 1.5)
            if scale_type != "type1":
                self.prior.scale.proj.weight.normal_(0, 0.1)
                self.prior.scale.proj.bias.uniform_(0.5, 1.5)

    def forward(self, route, tgt, query_pos, memory, extents, grid=(HEIGHT, WIDTH)):
        """route 'explicit' | 'fused'; tgt, query_pos (Q, B, d); memory (H*W, B, d) on the (H, W) grid;
        extents (B, 2). Returns the co-attention output (Q, B, d) and the prior used (G or its factors)."""
        height, width = grid
        centre = self.reference(self.prior.query_features(tgt, query_pos)).sigmoid() * extents[:, None, :]
        grid_x = torch.arange(width, dtype=torch.float32)
        grid_y = torch.arange(height, dtype=torch.float32)
        make = self.prior.log_prior if route == "explicit" else self.prior.factors
        prior = make(tgt, query_pos, centre, grid_x, grid_y)
        out = self.attention(tgt + query_pos, memory, memory, padding_mask(extents, height, width), prior)
        return out, prior


def inputs(batch=2, seed=1, height=HEIGHT, width=WIDTH, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    tgt = torch.randn(QUERIES, batch, D_MODEL, generator=generator, dtype=dtype)
    query_pos = torch.randn(QUERIES, batch, D_MODEL, generator=generator, dtype=dtype)
    memory = torch.randn(height * width, batch, D_MODEL, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (tgt, query_pos, memory)]


def logit_error_bound(attention, query, key, factors):
    """Largest float32 difference of the two routes' logits (Higham's dot-product bound, both routes):
    |fl(a . b) - a . b| <= n u sum |a_i b_i| for n terms. The fused logit sums q.k / sqrt(d_h) and the F prior
    terms (n = d_h + F); the explicit one sums q.k and adds G, computed to a few u relative. So
    eps = 2 (d_h + F) u max (|q| . |k| / sqrt(d_h) + |f| . |g| + |G|), with G = f . g."""
    with torch.no_grad():
        w_q, w_k, _ = attention.in_proj_weight.chunk(3)
        b_q, b_k, _ = attention.in_proj_bias.chunk(3)
        q = attention._heads(query, w_q, b_q)  # (B, nhead, Q, d_h)
        k = attention._heads(key, w_k, b_k)
        head_dim, features = q.shape[-1], factors.key.shape[-1]
        terms = (q.abs() @ k.abs().transpose(-1, -2) / math.sqrt(head_dim)
                 + factors.query.abs() @ factors.key.abs().T + factors.dense().abs())  # (B, nhead, Q, S)
    return 2 * (head_dim + features) * U32 * terms.max().item()


def tolerance(eps, reference):
    """A logit perturbation of at most eps moves the softmax weights by at most e^(2 eps) - 1 ~ 2 eps (l1), and
    a gradient uses the weights twice: 4 eps relative to the tensor's scale. 256 u covers the float32 rounding
    of the remaining operations, which the two routes order differently."""
    return (4 * eps + 256 * U32) * reference.abs().max().item()


def compare(got, expected, eps, what):
    limit = tolerance(eps, expected)
    error = (got - expected).abs().max().item()
    assert error <= limit, f"{what}: |fused - explicit| = {error:.3g} > {limit:.3g}"


# --- the factors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 7, 84])
def test_lagrange_basis_interpolates_quadratics_exactly(size):
    grid = torch.arange(size, dtype=torch.float64)
    nodes, basis = lagrange_basis(grid)
    assert basis.shape == (size, 3) and len(set(nodes.tolist())) == 3
    torch.testing.assert_close(basis.sum(-1), torch.ones(size, dtype=torch.float64), rtol=0, atol=1e-15)
    assert basis.min() >= -1 / 8 - 1e-15 and basis.max() <= 1 + 1e-15  # bounded: the float error stays small
    for coefficients in ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [3.5, -40.0, 7.25]):
        def quadratic(x):
            return coefficients[0] * x ** 2 + coefficients[1] * x + coefficients[2]
        torch.testing.assert_close(basis @ quadratic(nodes), quadratic(grid), rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("smooth", [8.0, 4.0])
@pytest.mark.parametrize("head_mixture, query_mixture", MIXTURES)
@pytest.mark.parametrize("scale_type", list(SCALES))
@pytest.mark.parametrize("grid", [(HEIGHT, WIDTH), (1, 1), (1, 4), (6, 2)])
def test_factors_multiply_out_to_g_in_float64(scale_type, head_mixture, query_mixture, smooth, grid):
    """query @ key.T = G (the explicit route, which tests/test_smca.py checks against the spec), including its
    query-only terms, so the two routes' logits are equal, not just equal up to a per-query constant. Exact in
    real arithmetic: the float64 tolerance is 64 u_64 times the largest term of the sum."""
    module = CoAttention(scale_type, head_mixture, query_mixture, smooth).double()
    height, width = grid
    tgt, query_pos, _ = inputs(dtype=torch.float64, height=height, width=width)
    centre = torch.rand(2, QUERIES, 2, dtype=torch.float64) * torch.tensor([width, height])
    grid_x, grid_y = torch.arange(width, dtype=torch.float32), torch.arange(height, dtype=torch.float32)
    with torch.no_grad():
        dense = module.prior.log_prior(tgt, query_pos, centre, grid_x, grid_y)
        factors = module.prior.factors(tgt, query_pos, centre, grid_x, grid_y)
    assert dense.dtype == factors.query.dtype == torch.float64
    expected_features = 9 if isinstance(module.prior.scale, CoupledPolynomial) else 6
    assert factors.query.shape == (2, NHEAD, QUERIES, expected_features)
    assert factors.key.shape == (height * width, expected_features)
    largest = (factors.query.abs() @ factors.key.abs().T).max().item()
    torch.testing.assert_close(factors.dense(), dense, rtol=0, atol=64 * U64 * largest)
    off = mixture_mask(QUERIES, NHEAD, head_mixture, query_mixture).t() == 0  # (nhead, Q)
    assert (factors.query[:, off] == 0).all() and (dense[:, off] == 0).all()  # no prior: zero features
    assert (factors.query[:, ~off] != 0).any(dim=-1).all()


# --- float32 parity: outputs and gradients -------------------------------------------------------------------

def run_both(module, tgt, query_pos, memory, extents):
    """Output and every gradient (inputs and parameters) of both routes for the same upstream gradient."""
    results = {}
    wrt = {"tgt": tgt, "query_pos": query_pos, "memory (k, v)": memory, **dict(module.named_parameters())}
    for route in ("explicit", "fused"):
        out, prior = module(route, tgt, query_pos, memory, extents)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((out * upstream).sum(), list(wrt.values()), allow_unused=True)
        results[route] = {"out": out.detach(), "prior": prior,
                          **{name: g for name, g in zip(wrt, grads) if g is not None}}
    return results


@pytest.mark.parametrize("smooth", [8.0, 4.0])
@pytest.mark.parametrize("head_mixture, query_mixture", MIXTURES)
@pytest.mark.parametrize("scale_type", list(SCALES))
def test_fused_equals_explicit_outputs_and_every_gradient(scale_type, head_mixture, query_mixture, smooth):
    module = CoAttention(scale_type, head_mixture, query_mixture, smooth)
    tgt, query_pos, memory = inputs()
    results = run_both(module, tgt, query_pos, memory, EXTENTS)
    factors, dense = results["fused"]["prior"], results["explicit"]["prior"]
    assert isinstance(factors, FactoredPrior) and isinstance(dense, torch.Tensor)
    eps = logit_error_bound(module.attention, tgt + query_pos, memory, factors)
    assert eps < 1e-3  # the bound is sharp enough for the comparison to catch a wrong term
    explicit = results["explicit"]
    expected_names = {"out", "prior", "tgt", "query_pos", "memory (k, v)", "reference.layers.0.weight",
                      "prior.offset.weight", "attention.in_proj_weight", "attention.out_proj.weight"}
    if scale_type != "type1":
        expected_names.add("prior.scale.proj.weight")
    assert expected_names <= set(explicit) and set(explicit) == set(results["fused"])
    for name, value in explicit.items():
        if name != "prior":
            assert value.abs().max() > 0, name
            compare(results["fused"][name], value, eps, name)


@pytest.mark.quick
def test_batch_of_one_equals_its_image_in_a_padded_batch_of_two():
    """Image 0 (7 x 3 cells) alone on its own grid, and padded to 7 x 5 beside image 1: the Lagrange nodes move
    with the grid, G on the image's cells does not."""
    module = CoAttention("type4")
    tgt, query_pos, memory = inputs()
    pair = {route: module(route, tgt, query_pos, memory, EXTENTS)[0] for route in ("explicit", "fused")}
    width, height = EXTENTS[0].int().tolist()
    cells = ~padding_mask(EXTENTS[:1], HEIGHT, WIDTH)[0]  # image 0's cells in the padded grid
    alone_memory = memory[cells, :1]  # (h*w, 1, d), row-major as the backbone gives it
    alone = module("fused", tgt[:, :1], query_pos[:, :1], alone_memory, EXTENTS[:1], grid=(height, width))[0]
    for route, out in pair.items():
        torch.testing.assert_close(alone, out[:, :1], rtol=0, atol=1e-5, msg=route)


@pytest.mark.quick
def test_fused_route_keeps_padded_keys_at_zero_weight():
    module = CoAttention("type3", query_mixture=True)
    tgt, query_pos, memory = inputs()
    with torch.no_grad():
        _, factors = module("fused", tgt, query_pos, memory, EXTENTS)
        weights = module.attention.attention_weights(tgt + query_pos, memory, padding_mask(EXTENTS, HEIGHT, WIDTH),
                                                     factors)  # (B, nhead, Q, S)
    padded = padding_mask(EXTENTS, HEIGHT, WIDTH)
    assert (weights.permute(0, 3, 1, 2)[padded] == 0).all() and (weights.permute(0, 3, 1, 2)[~padded] > 0).all()


@pytest.mark.parametrize("training", [False, True])
def test_fused_route_runs_in_the_fused_cpu_kernel_without_dropout(training):
    """Without dropout, v is padded to the augmented head dim so PyTorch's CPU flash kernel (no (Q, S) tensor)
    can run: restricted to that kernel, the forward must not fail. With dropout that kernel does not apply
    (SDPA's math kernel runs, for DETR's co-attention as well), and v keeps d_h."""
    module = CoAttention("type4")
    module.attention.dropout = 0.1
    module.train(training)
    tgt, query_pos, memory = inputs()
    backends = [SDPBackend.MATH] if training else [SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends):
        out, _ = module("fused", tgt, query_pos, memory, EXTENTS)
    assert out.shape == (QUERIES, 2, D_MODEL) and torch.isfinite(out).all()


@pytest.mark.parametrize("scale_type, grid, fused", [
    ("type4", (42, 42), True), ("type4", (25, 42), True), ("type4", (50, 84), False), ("type4", (43, 42), False),
    ("type3", (84, 84), True), ("type1", (84, 84), True)])
def test_type4_takes_the_explicit_route_past_its_accurate_grid_size(scale_type, grid, fused):
    height, width = grid
    prior = SpatialPrior(D_MODEL, NHEAD, SCALES[scale_type](D_MODEL, NHEAD), 8.0,
                         mixture_mask(QUERIES, NHEAD, False, False), impl="fused")
    tgt, query_pos, _ = inputs(height=1, width=1)
    centre = torch.rand(2, QUERIES, 2) * torch.tensor([width, height])
    with torch.no_grad():
        out = prior(tgt, query_pos, centre, torch.arange(width, dtype=torch.float32),
                    torch.arange(height, dtype=torch.float32))
    assert isinstance(out, FactoredPrior) == fused
    if not fused:
        assert out.shape == (2, NHEAD, QUERIES, height * width)


# --- whole models ------------------------------------------------------------------------------------------------

def train_step_results(args, seed=0):
    """Outputs, loss and every parameter gradient of one forward + loss + backward on a padded batch."""
    torch.manual_seed(seed)
    model, criterion, _ = build_model(args)
    model.train()
    generator = torch.Generator().manual_seed(1)
    images = nested_tensor_from_tensor_list([torch.randn(3, 96, 160, generator=generator),
                                             torch.randn(3, 128, 64, generator=generator)])  # padded both ways
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.3, 0.6, 0.2, 0.5], [0.7, 0.2, 0.3, 0.3]]), "labels": torch.tensor([2, 3])}]
    calls = []  # (co-attention module, query, key, prior) per decoder layer
    handles = [layer.multihead_attn.register_forward_pre_hook(
        lambda m, a, kw: calls.append((m, a[0], a[1], kw["attn_bias"])), with_kwargs=True)
        for layer in model.transformer.decoder.layers]
    outputs = model(images)
    for handle in handles:
        handle.remove()
    losses = criterion(outputs, targets)
    loss = sum(weighted(losses, criterion.weight_dict).values())
    loss.backward()
    results = {"pred_logits": outputs["pred_logits"].detach(), "pred_boxes": outputs["pred_boxes"].detach(),
               "loss": loss.detach()}
    results.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    return results, calls, {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("flags", [
    {"dynamic_scale": "type1"}, {"dynamic_scale": "type2"}, {"dynamic_scale": "type3"}, {"dynamic_scale": "type4"},
    {"dynamic_scale": "type2", "head_mixture": True}, {"dynamic_scale": "type2", "query_mixture": True},
    {"dynamic_scale": "type4", "head_mixture": True, "query_mixture": True, "smooth": 4},
    {"dynamic_scale": "type3", "backbone": "resnet50", "dilation": True},  # DC5: stride 16
], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_whole_model_forward_loss_backward_fused_equals_explicit(tiny_args, flags):
    """Dropout 0 (the two kernels would draw different dropout masks). The tolerance is the module-level one for
    the largest logit bound over the decoder layers, doubled for every decoder layer a perturbation passes
    (LayerNorm'd layers of this size amplify a relative perturbation less than that)."""
    results = {}
    for route in ("explicit", "fused"):
        args = tiny_args(dropout=0.0, prior_impl=route, **flags)
        results[route], calls, trainable = train_step_results(args)
        assert len(calls) == args.dec_layers
        assert all(isinstance(prior, FactoredPrior if route == "fused" else torch.Tensor) for *_, prior in calls)
    assert model_stride(args) == (16 if flags.get("dilation") else 32)
    # every trainable parameter gets a gradient in both routes (no prior term dropped)
    assert {n for n in results["explicit"] if n not in ("pred_logits", "pred_boxes", "loss")} == trainable
    assert set(results["fused"]) == set(results["explicit"])
    eps = 2 ** args.dec_layers * max(logit_error_bound(*call) for call in calls)
    assert eps < 5e-3  # the bound stays small against O(1) outputs, so the comparison below is sharp
    for name, value in results["explicit"].items():
        compare(results["fused"][name], value, eps, name)


def model_stride(args):
    return build_model(args)[0].backbone.stride


def test_route_is_not_an_architecture_flag_and_checkpoints_cross_routes(tiny_args):
    """Same parameter names and values on both routes; a run resumed with the other route is not refused."""
    import main
    from options import ARCH_FLAGS
    from rundir.run_config import explicit_flags, reconcile_config

    models = [build_model(tiny_args(dynamic_scale="type4", prior_impl=route))[0] for route in ("fused", "explicit")]
    assert list(models[0].state_dict()) == list(models[1].state_dict())
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    assert "prior_impl" not in ARCH_FLAGS
    assert tiny_args().prior_impl == "fused"  # the default
    parser = main.get_args_parser()
    argv = ["--dynamic_scale", "type4", "--prior_impl", "explicit"]
    args = parser.parse_args(argv)
    stored = {"dynamic_scale": "type4", "prior_impl": "fused"}
    assert reconcile_config(args, explicit_flags(parser, argv), stored, ARCH_FLAGS, ckpt_path="x") == []
    assert args.prior_impl == "explicit"
