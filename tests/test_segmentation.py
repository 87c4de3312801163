"""DETR's segmentation head (--masks): the panoptic checkpoints' layout, mask-head shapes and padding, the frozen
detector of --frozen_weights, DETR's mask losses against a plain reference, and the ablation flags with --masks."""
import pytest
import torch
import torch.nn.functional as F

import main
import options
from models import build_model
from models.criterion import SetCriterion
from models.criterion import dice_loss, weighted
from models.segmentation import ATTENTION_MAPS, DETRsegm, MaskHeadSmallConv, MHAttentionMap, ScaledMHAttentionMap
from test_detr_layout import RESNET_DEPTHS, assert_checkpoint_layout, detr_checkpoint_shapes
from test_models import ZERO_INPUT_AT_INIT, images
import run_setup
from util.misc import nested_tensor_from_tensor_list

pytestmark = pytest.mark.usefixtures("single_thread")

COCO_PANOPTIC_CLASSES = 250  # DETR's num_classes for coco_panoptic: class_embed has 251 rows


def panoptic_checkpoint_shapes(depths, d_model=256, nheads=8):
    """{key: shape} of DETR's panoptic checkpoints (detr-r50-panoptic, detr-r50-dc5-panoptic, detr-r101-panoptic),
    written from DETR's DETRsegm: the detector under 'detr.', bbox_attention = MHAttentionMap(d, d, nheads),
    mask_head = MaskHeadSmallConv(d + nheads, [1024, 512, 256], d) with GroupNorm after each 3x3 conv."""
    shapes = {f"detr.{k}": v for k, v in detr_checkpoint_shapes(depths, num_classes=COCO_PANOPTIC_CLASSES).items()}
    for name in ("q_linear", "k_linear"):
        shapes[f"bbox_attention.{name}.weight"] = (d_model, d_model)
        shapes[f"bbox_attention.{name}.bias"] = (d_model,)
    dim = d_model + nheads
    widths = [dim, d_model // 2, d_model // 4, d_model // 8, d_model // 16]
    for index, (in_width, width) in enumerate(zip([dim] + widths[:-1], widths), start=1):
        shapes[f"mask_head.lay{index}.weight"] = (width, in_width, 3, 3)
        shapes[f"mask_head.lay{index}.bias"] = (width,)
        shapes[f"mask_head.gn{index}.weight"] = (width,)
        shapes[f"mask_head.gn{index}.bias"] = (width,)
    shapes["mask_head.out_lay.weight"] = (1, widths[-1], 3, 3)
    shapes["mask_head.out_lay.bias"] = (1,)
    for index, (fpn, width) in enumerate(zip((1024, 512, 256), widths[1:4]), start=1):
        shapes[f"mask_head.adapter{index}.weight"] = (width, fpn, 1, 1)
        shapes[f"mask_head.adapter{index}.bias"] = (width,)
    return shapes


def build_panoptic(*flags):
    """DETR's panoptic model as its README command builds it (--masks --dataset_file coco_panoptic), no data read."""
    args = main.get_args_parser().parse_args(
        ["--masks", "--dataset_file", "coco_panoptic", "--backbone_weights", "none", "--device", "cpu", *flags])
    run_setup.resolve_args(args)
    assert args.num_classes == COCO_PANOPTIC_CLASSES
    return build_model(args)[0]


def test_panoptic_table_sanity():
    shapes = panoptic_checkpoint_shapes(RESNET_DEPTHS["resnet50"])
    assert shapes["detr.class_embed.weight"] == (251, 256)
    assert shapes["mask_head.lay1.weight"] == (264, 264, 3, 3)
    assert shapes["mask_head.lay5.weight"] == (16, 32, 3, 3)
    assert shapes["mask_head.adapter1.weight"] == (128, 1024, 1, 1)
    assert shapes["mask_head.adapter3.weight"] == (32, 256, 1, 1)
    assert shapes["mask_head.out_lay.weight"] == (1, 16, 3, 3)
    assert len([k for k in shapes if not k.startswith("detr.")]) == 4 + 4 * 5 + 2 + 6


@pytest.mark.parametrize("backbone, flags", [("resnet50", []), ("resnet50", ["--dilation"]),
                                             ("resnet101", ["--backbone", "resnet101"])],
                         ids=["detr-r50-panoptic", "detr-r50-dc5-panoptic", "detr-r101-panoptic"])
def test_panoptic_checkpoint_layout_and_strict_load(backbone, flags):
    torch.manual_seed(0)
    model = build_panoptic(*flags)
    expected = panoptic_checkpoint_shapes(RESNET_DEPTHS[backbone])
    assert_checkpoint_layout(model, expected)
    checkpoint = {k: torch.randn(shape) for k, shape in expected.items()}
    result = model.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    state = model.state_dict()
    for key in ("detr.class_embed.weight", "mask_head.gn3.bias", "bbox_attention.k_linear.weight"):
        assert torch.equal(state[key], checkpoint[key]), key
    assert model.detr.backbone.stride == (16 if "--dilation" in flags else 32)


def test_official_panoptic_checkpoint_sets_the_flags(tmp_path):
    """An official panoptic checkpoint stores no config; --masks and num_classes 250 are read from its weights."""
    from rundir import run_config
    state = {k: torch.zeros(shape) for k, shape in panoptic_checkpoint_shapes(RESNET_DEPTHS["resnet101"]).items()}
    args = main.get_args_parser().parse_args(["--dataset_file", "coco_panoptic"])
    messages = run_config.infer_official_config(state, "detr-r101-panoptic-40021d53.pth", args, set())
    assert args.masks and args.backbone == "resnet101" and args.num_classes == 250
    assert any("--masks" in m for m in messages)


# --- mask head ----------------------------------------------------------------------------------------------

def tiny_masks(tiny_args, **flags):
    return build_model(tiny_args(masks=True, dataset_file="coco_panoptic", **flags))


@pytest.mark.parametrize("sizes", [[(64, 96)], [(64, 96), (96, 64)], [(64, 64), (80, 48), (96, 96)]],
                         ids=["batch1", "batch2", "batch3"])
def test_mask_head_output_shapes(tiny_args, sizes):
    torch.manual_seed(0)
    model, _, _ = tiny_masks(tiny_args)
    model.eval()
    with torch.no_grad():
        out = model(images(*sizes))
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    queries = model.detr.num_queries
    # stride 4 of the padded canvas (layer1 of the ResNet), one map per query
    assert out["pred_masks"].shape == (len(sizes), queries, height // 4, width // 4)
    assert out["pred_logits"].shape[:2] == out["pred_boxes"].shape[:2] == (len(sizes), queries)
    assert torch.isfinite(out["pred_masks"]).all()


@pytest.mark.quick
def test_attention_map_ignores_padding_and_sums_to_one_over_heads_and_cells():
    torch.manual_seed(0)
    attention = MHAttentionMap(16, 16, num_heads=4)
    query, memory = torch.randn(2, 3, 16), torch.randn(2, 16, 4, 5)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True
    weights = attention(query, memory, mask)  # (B, Q, nhead, H, W)
    assert weights.shape == (2, 3, 4, 4, 5)
    assert torch.all(weights[1][:, :, mask[1]] == 0)
    torch.testing.assert_close(weights.sum((2, 3, 4)), torch.ones(2, 3))
    # plain reference: per head q.k / sqrt(d_h), one softmax over (head, cell) jointly (DETR's)
    q = attention.q_linear(query).view(2, 3, 4, 4)
    k = torch.einsum("bchw,oc->bohw", memory, attention.k_linear.weight) + attention.k_linear.bias[:, None, None]
    logits = torch.einsum("bqnc,bnchw->bqnhw", q, k.view(2, 4, 4, 4, 5)) / 2.0
    logits = logits.masked_fill(mask[:, None, None], float("-inf"))
    torch.testing.assert_close(weights, logits.flatten(2).softmax(-1).view_as(weights))
    # the unpadded image's map equals its map alone (cut to its cells)
    alone = attention(query[1:], memory[1:, :, :2, :3], mask[1:, :2, :3])
    torch.testing.assert_close(weights[1:, :, :, :2, :3], alone)


def test_mask_head_sees_the_padding_mask_through_the_attention_map(tiny_args):
    """A padded image's attention map is 0 on its padded cells, whichever canvas it is batched on."""
    torch.manual_seed(0)
    model, _, _ = tiny_masks(tiny_args)
    model.eval()
    maps = []
    hook = model.bbox_attention.register_forward_hook(lambda m, a, out: maps.append(out))
    with torch.no_grad():
        model(images((64, 64), (128, 192)))
    hook.remove()
    small = maps[0][0]  # (Q, nhead, 4, 6) on a 128 x 192 canvas, the image covering 2 x 2 cells
    assert small.shape[-2:] == (4, 6)
    assert torch.all(small[..., 2:, :] == 0) and torch.all(small[..., :, 2:] == 0)
    torch.testing.assert_close(small.sum((1, 2, 3)), torch.ones(small.shape[0]))


@pytest.mark.parametrize("flags", [{}, {"dynamic_scale": "type2", "query_mixture": True},
                                   {"dynamic_scale": "type4", "head_mixture": True, "smooth": 4},
                                   {"dynamic_scale": "type1", "cls_loss": "ce"}],
                         ids=["detr", "type2-query_mixture", "type4-head_mixture-smooth4", "type1-ce"])
def test_ablation_flags_combine_with_masks_and_every_parameter_learns(tiny_args, flags):
    torch.manual_seed(0)
    model, criterion, _ = tiny_masks(tiny_args, dropout=0.0, **flags)
    assert isinstance(model, DETRsegm) and hasattr(model.detr.transformer.decoder, "priors") == bool(flags.get(
        "dynamic_scale"))
    samples = nested_tensor_from_tensor_list(images((64, 96), (96, 64)))
    targets = [synthetic_target(64, 96, seed=1), synthetic_target(96, 64, seed=2)]
    losses = criterion(model(samples), targets)
    assert {"loss_mask", "loss_dice"} <= set(losses) and not any(k.startswith("loss_mask_") for k in losses)
    sum(weighted(losses, criterion.weight_dict).values()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not [n for n, p in trainable.items() if p.grad is None]
    zero_at_init = {f"detr.{n}" for n in ZERO_INPUT_AT_INIT}  # DETR's zero decoder input (see test_models)
    assert not [n for n, p in trainable.items() if not p.grad.any() and n not in zero_at_init]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def synthetic_target(height, width, seed, count=2):
    """A target of ``count`` rectangles with their masks, boxes in normalised cxcywh (the loss's format)."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    boxes = []
    for k in range(count):
        y0, x0 = (int(torch.randint(0, s // 2, (1,), generator=generator)) for s in (height, width))
        h, w = height // 3, width // 3
        masks[k, y0:y0 + h, x0:x0 + w] = True
        boxes.append([(x0 + w / 2) / width, (y0 + h / 2) / height, w / width, h / height])
    return {"labels": torch.tensor([1, 3][:count]), "boxes": torch.tensor(boxes), "masks": masks}


# --- DETR's mask losses -------------------------------------------------------------------------------------

class FixedMatcher(torch.nn.Module):
    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, outputs, targets):
        return self.indices


@pytest.mark.quick
def test_scaled_attention_map_is_detrs_times_heads_times_unpadded_cells():
    torch.manual_seed(0)
    detr_map, scaled_map = MHAttentionMap(16, 16, num_heads=4), ScaledMHAttentionMap(16, 16, num_heads=4)
    scaled_map.load_state_dict(detr_map.state_dict(), strict=True)  # same weights, same keys
    query, memory = torch.randn(2, 3, 16), torch.randn(2, 16, 4, 5)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True  # image 1: 3 x 4 = 12 unpadded cells, image 0: 20
    weights, scaled = detr_map(query, memory, mask), scaled_map(query, memory, mask)
    torch.testing.assert_close(scaled[0], weights[0] * 4 * 20)
    torch.testing.assert_close(scaled[1], weights[1] * 4 * 12)
    assert torch.all(scaled[1][:, :, mask[1]] == 0)
    # a query that attends evenly (no key depends on the cell) reads 1 at every unpadded cell of every head
    torch.nn.init.zeros_(scaled_map.k_linear.weight)
    uniform = scaled_map(query, memory, mask)
    torch.testing.assert_close(uniform[1][:, :, ~mask[1]], torch.ones(3, 4, 12))
    torch.testing.assert_close(uniform[0], torch.ones(3, 4, 4, 5))
    assert set(ATTENTION_MAPS) == set(options.MASK_ATTENTIONS)


def test_the_mask_head_learns_query_masks_fast_only_from_the_scaled_map():
    """Issue 25's cause, isolated: the mask head reads each query only through its attention map. Given the ideal
    map (even over the query's own box) beside shared features of a trained detector's magnitude (std 5), and
    asked for that box as the mask (stride 4 of a stride-32 map), the head fits it within 200 Adam steps when the
    map is scaled (--mask_attention scaled: DICE loss near 0.07 here) and hardly moves at DETR's scale, 1 / (heads x
    cells) per cell (near 0.66; 1 is no overlap). Mean loss of the last 20 steps, each on a fresh batch."""
    heads, width, cells = 4, 32, 8
    boxes = torch.Generator().manual_seed(1)

    def batch(size=8):  # two queries per image, each with its own random box of cells; masks at stride 4 of src
        src = 5 * torch.randn(size, width, cells, cells, generator=boxes)
        maps = torch.zeros(size, 2, heads, cells, cells)
        for b in range(size):
            for q in range(2):
                y0, x0 = torch.randint(0, cells - 2, (2,), generator=boxes).tolist()
                h, w = torch.randint(2, cells - max(y0, x0) + 1, (2,), generator=boxes).tolist()
                maps[b, q, :, y0:y0 + h, x0:x0 + w] = 1.0
        targets = F.interpolate(maps[:, :, 0], scale_factor=8, mode="nearest")  # (B, 2, 8 cells, 8 cells)
        # layer3, layer2, layer1 at strides 16, 8, 4 of a stride-32 src
        fpns = [torch.randn(size, channels, cells * 2 ** k, cells * 2 ** k, generator=boxes)
                for k, channels in ((1, 16), (2, 8), (3, 8))]
        return src, maps / maps.sum((2, 3, 4), keepdim=True), targets, fpns

    def train(scale):
        torch.manual_seed(0)
        head = MaskHeadSmallConv(width + heads, (16, 8, 8), width)
        optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3)
        losses = []
        for _ in range(200):
            src, maps, targets, fpns = batch()
            logits = head(src, maps * scale, fpns).view_as(targets)
            loss = dice_loss(logits.flatten(0, 1).flatten(1), targets.flatten(0, 1).flatten(1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return sum(losses[-20:]) / 20

    scaled, detr = train(heads * cells * cells), train(1.0)
    assert scaled < 0.2 < 0.5 < detr, (scaled, detr)


@pytest.mark.quick
def test_mask_losses_equal_a_plain_reference():
    """loss_mask and loss_dice against a loop over matched pairs with torchvision's focal loss: bilinear upsampling
    of the stride-4 logits to the padded canvas, focal averaged over pixels, DICE with +1 smoothing, both summed
    and divided by the number of target boxes; the smaller image's mask is zero-padded (DETR)."""
    from torchvision.ops import sigmoid_focal_loss

    torch.manual_seed(0)
    targets = [synthetic_target(40, 48, seed=3, count=2), synthetic_target(32, 56, seed=4, count=1)]
    pred_masks = torch.randn(2, 5, 10, 14)  # canvas 40 x 56 at stride 4
    indices = [(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    criterion = SetCriterion(9, FixedMatcher(indices), {}, ["masks"], 0.1, 0.25, 2.0)
    outputs = {"pred_logits": torch.randn(2, 5, 10), "pred_boxes": torch.rand(2, 5, 4), "pred_masks": pred_masks}
    losses = criterion(outputs, targets)
    focal = dice = 0.0
    for b, (queries, target_ids) in enumerate(indices):
        for q, t in zip(queries.tolist(), target_ids.tolist()):
            canvas = torch.zeros(40, 56)
            mask = targets[b]["masks"][t].float()
            canvas[: mask.shape[0], : mask.shape[1]] = mask
            logits = F.interpolate(pred_masks[b, q][None, None], size=(40, 56), mode="bilinear",
                                   align_corners=False)[0, 0]
            focal += sigmoid_focal_loss(logits, canvas, alpha=0.25, gamma=2.0, reduction="mean")
            p = logits.sigmoid()
            dice += 1 - (2 * (p * canvas).sum() + 1) / (p.sum() + canvas.sum() + 1)
    torch.testing.assert_close(losses["loss_mask"], focal / 3)
    torch.testing.assert_close(losses["loss_dice"], dice / 3)


# --- --frozen_weights ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone_norm", ["frozen", "batch"])
def test_frozen_detector_only_the_mask_head_changes_after_a_step(tiny_args, backbone_norm):
    torch.manual_seed(0)
    args = tiny_args(masks=True, dataset_file="coco_panoptic", frozen_weights="box.pth", backbone_norm=backbone_norm)
    model, criterion, _ = build_model(args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("mask_head.", "bbox_attention.")) for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    main_groups = main._param_groups(model, args)
    optimizer = torch.optim.AdamW(main_groups, lr=1e-2)
    model.train()
    samples = nested_tensor_from_tensor_list(images((64, 96), (96, 64)))
    targets = [synthetic_target(64, 96, seed=1), synthetic_target(96, 64, seed=2)]
    losses = criterion(model(samples), targets)
    sum(weighted(losses, criterion.weight_dict).values()).backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # parameters and buffers (BatchNorm statistics of a trainable-norm trunk) of the detector stay as loaded
    assert changed and all(k.startswith(("mask_head.", "bbox_attention.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("mask_head.") for k in changed) and any(k.startswith("bbox_attention.") for k in changed)
