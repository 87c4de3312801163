"""The multi-scale encoders against plain re-implementations (docs/multiscale-smca.md, "Encoder layers"): an I layer
equals block-diagonal attention over the concatenated levels (one block's weights, or each level's own), an M layer
plain attention over the concatenation, Z's depthwise-conv layer its formula; then the whole multi-scale
transformer on padded batches (padding below and on the right) equals each image alone, for both encoders."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import build_detr
from models.ms_encoder import DWConvEncoder, DWConvEncoderLayer, MultiScaleAttentionEncoder
from models.transformer import TransformerEncoderLayer

pytestmark = pytest.mark.usefixtures("single_thread")

B, D, M, FFN = 2, 16, 4, 24
SIZES = [(4, 6), (2, 3), (1, 2)]  # padded (H_l, W_l); image 0 padded below, image 1 on the right
VALID = [[(3, 6), (2, 3), (1, 2)], [(4, 4), (2, 2), (1, 1)]]  # per image, per level: unpadded (h, w)


def padding(sizes=SIZES, valid=VALID):
    """Per level (B, H, W) True on padding."""
    masks = []
    for level, (h, w) in enumerate(sizes):
        rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
        masks.append(torch.stack([(rows >= image[level][0]) | (cols >= image[level][1]) for image in valid]))
    return masks


def sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in SIZES)
    src = torch.randn(n, B, D, generator=g)
    pos = torch.randn(n, B, D, generator=g)
    mask = torch.cat([m.flatten(1) for m in padding()], 1)  # (B, N)
    return src, pos, mask


def reference_post_norm_layer(layer, x, pos, allowed):
    """DETR's post-norm encoder layer written out: per image and head, softmax over the allowed keys
    (allowed (B, N, N) bool), then add, LN1, FFN, add, LN2."""
    attn = layer.self_attn
    d_h = D // M
    w_q, w_k, w_v = attn.in_proj_weight.split(D)
    b_q, b_k, b_v = attn.in_proj_bias.split(D)
    q, k, v = (x + pos) @ w_q.T + b_q, (x + pos) @ w_k.T + b_k, x @ w_v.T + b_v
    out = torch.zeros_like(x)
    for b in range(x.shape[1]):
        for m in range(M):
            cols = slice(m * d_h, (m + 1) * d_h)
            logits = (q[:, b, cols] @ k[:, b, cols].T / math.sqrt(d_h)).masked_fill(~allowed[b], float("-inf"))
            out[:, b, cols] = logits.softmax(-1) @ v[:, b, cols]
    x = F.layer_norm(x + out @ attn.out_proj.weight.T + attn.out_proj.bias, (D,), layer.norm1.weight, layer.norm1.bias)
    ffn = (x @ layer.linear1.weight.T + layer.linear1.bias).relu() @ layer.linear2.weight.T + layer.linear2.bias
    return F.layer_norm(x + ffn, (D,), layer.norm2.weight, layer.norm2.bias)


def allowed_keys(mask, block_diagonal):
    """(B, N, N): valid keys, within the query's own level when block_diagonal."""
    allowed = ~mask[:, None, :].expand(-1, mask.shape[1], -1)
    if block_diagonal:
        level = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(SIZES)])
        allowed = allowed & (level[:, None] == level[None, :])
    return allowed


def attention_encoder(pattern, intra_share):
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(D, M, FFN, dropout=0.0, normalize_before=False)
    encoder = MultiScaleAttentionEncoder(layer, pattern, len(SIZES), intra_share).eval()
    with torch.no_grad():  # each block its own draw, biases away from 0
        for p in encoder.parameters():
            p.normal_(0, 0.3)
    return encoder


@pytest.mark.quick
def test_shared_intra_layer_is_block_diagonal_attention_with_one_blocks_weights():
    encoder = attention_encoder("I", intra_share=True)
    src, pos, mask = sequences()
    expected = reference_post_norm_layer(encoder.layers[0], src, pos, allowed_keys(mask, True))
    torch.testing.assert_close(encoder(src, mask, pos, SIZES), expected, rtol=1e-5, atol=1e-5)


def test_unshared_intra_layer_gives_each_level_its_own_block():
    encoder = attention_encoder("I", intra_share=False)
    assert len(encoder.layers[0]) == len(SIZES)
    src, pos, mask = sequences()
    out = encoder(src, mask, pos, SIZES)
    lengths = [h * w for h, w in SIZES]
    start = 0
    for block, n in zip(encoder.layers[0], lengths):
        level = slice(start, start + n)
        allowed = ~mask[:, None, level].expand(-1, n, -1)
        expected = reference_post_norm_layer(block, src[level], pos[level], allowed)
        torch.testing.assert_close(out[level], expected, rtol=1e-5, atol=1e-5)
        start += n


def test_multi_layer_attends_over_every_level():
    encoder = attention_encoder("M", intra_share=True)
    src, pos, mask = sequences()
    expected = reference_post_norm_layer(encoder.layers[0], src, pos, allowed_keys(mask, False))
    torch.testing.assert_close(encoder(src, mask, pos, SIZES), expected, rtol=1e-5, atol=1e-5)


def test_pattern_runs_its_layers_in_order():
    encoder = attention_encoder("IM", intra_share=True)
    src, pos, mask = sequences()
    x = reference_post_norm_layer(encoder.layers[0], src, pos, allowed_keys(mask, True))
    expected = reference_post_norm_layer(encoder.layers[1], x, pos, allowed_keys(mask, False))
    torch.testing.assert_close(encoder(src, mask, pos, SIZES), expected, rtol=1e-5, atol=1e-5)


def reference_dwconv_layer(layer, maps, masks, pos):
    """Z's layer written out with F.conv2d and index arithmetic (see models/ms_encoder.py's docstring)."""
    kernel = layer.bottom_up.kernel_size[0]
    keep = [(~m)[:, None].float() for m in masks]

    def dw(conv, x, stride=1):
        return F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=kernel // 2, groups=D)

    a = [dw(layer.intra[i], F.conv2d(x + p, layer.conv1.weight, layer.conv1.bias) * k)
         for i, (x, p, k) in enumerate(zip(maps, pos, keep))]
    out = []
    for i, x in enumerate(maps):
        mix = a[i].clone()
        if i > 0:
            mix += dw(layer.bottom_up, a[i - 1] * keep[i - 1], stride=2)
        if i + 1 < len(maps):
            coarse = dw(layer.top_down, a[i + 1] * keep[i + 1])
            rows, cols = torch.arange(x.shape[2]) // 2, torch.arange(x.shape[3]) // 2
            mix += coarse[:, :, rows][:, :, :, cols]  # the coarse cell covering each fine cell
        y = (x + F.conv2d(mix, layer.conv2.weight, layer.conv2.bias)).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (D,), layer.norm1.weight, layer.norm1.bias)
        ffn = (y @ layer.linear1.weight.T + layer.linear1.bias).relu() @ layer.linear2.weight.T + layer.linear2.bias
        out.append(F.layer_norm(y + ffn, (D,), layer.norm2.weight, layer.norm2.bias).permute(0, 3, 1, 2))
    return out


@pytest.mark.quick
def test_dwconv_encoder_equals_its_formula():
    torch.manual_seed(0)
    encoder = DWConvEncoder(DWConvEncoderLayer(D, FFN, 0.0, len(SIZES), kernel_size=3), 2).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.3)
    src, pos, mask = sequences()
    lengths = [h * w for h, w in SIZES]

    def maps(seq):
        return [x.permute(1, 2, 0).reshape(B, D, h, w) for x, (h, w) in zip(seq.split(lengths), SIZES)]

    expected, pos_maps = maps(src), maps(pos)
    for layer in encoder.layers:
        expected = reference_dwconv_layer(layer, expected, padding(), pos_maps)
    expected = torch.cat([x.flatten(2).permute(2, 0, 1) for x in expected])
    torch.testing.assert_close(encoder(src, mask, pos, SIZES), expected, rtol=1e-5, atol=1e-5)


# --- the whole multi-scale transformer: a padded batch against each image alone ---------------------------------

IMAGES_PX = [(64, 128), (128, 64)]  # (h, w): image 0 is padded below, image 1 on the right


def level_inputs(strides, d_model, seed=0):
    """Per image, per level: (src (1, d, h, w), pos (1, d, h, w)) at the image's own size; and the padded batch
    (srcs, masks, pos) with noise in the padded cells (it must not matter)."""
    g = torch.Generator().manual_seed(seed)
    alone = [[(torch.randn(1, d_model, -(-h // s), -(-w // s), generator=g),
               torch.randn(1, d_model, -(-h // s), -(-w // s), generator=g)) for s in strides] for h, w in IMAGES_PX]
    top_h, top_w = max(h for h, _ in IMAGES_PX), max(w for _, w in IMAGES_PX)
    srcs, masks, pos = [], [], []
    for level, s in enumerate(strides):
        shape = (len(IMAGES_PX), d_model, -(-top_h // s), -(-top_w // s))
        src_l, pos_l = 100 * torch.randn(shape, generator=g), 100 * torch.randn(shape, generator=g)
        mask_l = torch.ones(shape[0], *shape[2:], dtype=torch.bool)
        for b, image in enumerate(alone):
            x, p = image[level]
            h, w = x.shape[-2:]
            src_l[b, :, :h, :w], pos_l[b, :, :h, :w], mask_l[b, :h, :w] = x[0], p[0], False
        srcs.append(src_l)
        masks.append(mask_l)
        pos.append(pos_l)
    return alone, (srcs, masks, pos)


@pytest.mark.parametrize("flags", [
    dict(ms_levels="16,32,64", enc_pattern="IMI", enc_layers=3, dynamic_scale="type3"),
    dict(ms_levels="16,32,64", enc_pattern="MI", enc_layers=2, intra_share=False, scale_select="none",
         dynamic_scale="type2", prior_impl="explicit"),
    dict(ms_levels="8,16,32,64", ms_encoder="dwconv", ms_prior="per_level", dynamic_scale="type4"),
], ids=["P", "P-unshared-joint", "Z"])
def test_a_padded_batch_equals_each_image_alone(flags):
    torch.manual_seed(0)
    model = build_detr(backbone="resnet18", hidden_dim=D, nheads=M, dim_feedforward=FFN, num_queries=5,
                       num_classes=3, dec_layers=2, **{"enc_layers": 2, **flags}).eval()
    transformer = model.transformer
    alone, (srcs, masks, pos) = level_inputs(transformer.strides, D)
    extent = torch.tensor([[w, h] for h, w in IMAGES_PX], dtype=torch.float32)  # pixels
    query = model.query_embed.weight
    with torch.no_grad():
        hs, box_reference, _ = transformer(srcs, masks, query, pos, extent)
        for b, image in enumerate(alone):
            single_masks = [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x, _ in image]
            hs_b, ref_b, _ = transformer([x for x, _ in image], single_masks, query, [p for _, p in image],
                                         extent[b:b + 1])
            torch.testing.assert_close(hs_b[:, 0], hs[:, b], rtol=0, atol=1e-5)
            torch.testing.assert_close(ref_b[0], box_reference[b], rtol=0, atol=1e-5)
