"""Multi-scale SMCA-DETR (docs/multiscale-smca.md): levels from the backbone, their projections and positions, the
multi-scale encoder (models/ms_encoder.py) and decoder (models/multiscale.py).

Checkpoint names added to DETR's: ``input_proj.{stride}`` (one per level, replacing DETR's ``input_proj``),
``transformer.level_embed`` (L, d) with --level_embed 1, and with a stride-8 level ``transformer.decoder_levels.conv``
(Z's downsampling of the encoded stride-8 map for the decoder).
"""
from typing import List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone import Joiner, image_extent
from models.detr import DETR
from models.ms_encoder import DWConvEncoder, DWConvEncoderLayer, MultiScaleAttentionEncoder
from models.multiscale import MultiScaleDecoder, MultiScaleDecoderLayer
from models.transformer import TransformerEncoderLayer, init_transformer
from util.misc import NestedTensor, nested_tensor_from_tensor_list

# Z: the stride-8 map is too long for the decoder's keys (16,700 at 800x1333); it enters downsampled to stride 16
DECODER_MIN_STRIDE = 16


class Level(NamedTuple):
    src: Tensor  # (B, d, H, W)
    mask: Tensor  # (B, H, W), True on padding
    pos: Tensor  # (B, d, H, W)


def _concat(levels: Sequence[Level]) -> Tuple[Tensor, Tensor, Tensor, List[Tuple[int, int]]]:
    """Levels -> src, pos (N, B, d), mask (B, N) and the sizes [(H_l, W_l)], finest first, row-major each."""
    src = torch.cat([lv.src.flatten(2).permute(2, 0, 1) for lv in levels])  # (N, B, d)
    pos = torch.cat([lv.pos.flatten(2).permute(2, 0, 1) for lv in levels])
    mask = torch.cat([lv.mask.flatten(1) for lv in levels], dim=1)  # (B, N)
    return src, mask, pos, [tuple(lv.src.shape[-2:]) for lv in levels]


def _split(memory: Tensor, levels: Sequence[Level]) -> List[Level]:
    """The encoder's memory (N, B, d) back into maps, with each level's mask and position."""
    lengths = [lv.mask[0].numel() for lv in levels]
    return [lv._replace(src=x.permute(1, 2, 0).view_as(lv.src)) for x, lv in zip(memory.split(lengths), levels)]


class FineLevelDownsample(nn.Module):
    """Z's decoder levels: the encoded finest map through a 3x3 stride-2 conv (on zeroed padding), at the next
    level's size, taking that level's mask and position (decoder levels 16', 16, 32, 64)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.conv = nn.Conv2d(d_model, d_model, kernel_size=3, stride=2, padding=1)

    def forward(self, levels: List[Level]) -> List[Level]:
        fine, coarser = levels[0], levels[1]
        src = self.conv(fine.src.masked_fill(fine.mask[:, None], 0.0))  # (B, d, H_next, W_next)
        return [coarser._replace(src=src), *levels[1:]]


class MultiScaleTransformer(nn.Module):
    """Encoder over the levels, then the multi-scale SMCA decoder. ``encoder`` and ``decoder`` are built by
    ``build_multiscale_detr``; ``strides`` are the encoder levels'."""

    def __init__(self, encoder: nn.Module, decoder: MultiScaleDecoder, d_model: int, nhead: int,
                 strides: Tuple[int, ...], level_embed: bool):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.d_model = d_model
        self.nhead = nhead
        self.strides = tuple(strides)
        self.decoder_levels = (FineLevelDownsample(d_model) if strides[0] < DECODER_MIN_STRIDE else nn.Identity())
        self._reset_parameters()
        if level_embed:
            self.level_embed = nn.Parameter(torch.randn(len(strides), d_model))  # N(0, 1), as Z
        else:
            self.register_buffer("level_embed", torch.zeros(len(strides), d_model), persistent=False)

    def _reset_parameters(self) -> None:
        """As the single-scale Transformer's (an own xavier draw per >1-D tensor, then the scale linears at weight 0,
        bias 1); the stride-8 downsampling keeps PyTorch's default, as Z's (created after its xavier pass)."""
        init_transformer(self)
        if isinstance(self.decoder_levels, FineLevelDownsample):
            self.decoder_levels.conv.reset_parameters()

    def forward(self, srcs: List[Tensor], masks: List[Tensor], query_embed: Tensor, pos_embeds: List[Tensor],
                extent: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """srcs, pos_embeds: per level (B, d, H_l, W_l), finest first; masks (B, H_l, W_l); query_embed (Q, d);
        extent (B, 2) unpadded (w, h) in pixels. Returns hs (L, B, Q, d), the box-logit reference (B, Q, 4) and
        the encoder's memory per level (B, d, H_l, W_l)."""
        levels = [Level(src, mask, pos + embed[None, :, None, None])
                  for src, mask, pos, embed in zip(srcs, masks, pos_embeds, self.level_embed)]
        src, mask, pos, sizes = _concat(levels)
        memory = self.encoder(src, mask, pos, sizes)  # (N, B, d)
        levels = _split(memory, levels)
        decoder_levels = self.decoder_levels(levels)
        memory, mask, pos, sizes = _concat(decoder_levels)
        batch = memory.shape[1]
        query_pos = query_embed.unsqueeze(1).repeat(1, batch, 1)  # (Q, B, d)
        tgt = torch.zeros_like(query_pos)
        hs, box_reference = self.decoder(tgt, memory, mask, pos, query_pos, sizes, extent)
        return hs.transpose(1, 2), box_reference, [level.src for level in levels]


class MultiScaleDETR(DETR):
    """DETR over several feature levels. ``input_proj.{stride}``: a 1x1 conv of the backbone stage at that stride,
    or, for the stride past the backbone's last, a 3x3 stride-2 conv of the raw last map (the paper's and Z's
    stride 64)."""

    def __init__(self, backbone: Joiner, transformer: MultiScaleTransformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, class_bias_prior: float = 0.0):
        strides = transformer.strides
        stage_strides = [backbone.stride // 2 ** (len(backbone.layer_channels) - 1 - i)
                         for i in range(len(backbone.layer_channels))]  # layer1-4: 4, 8, 16, 32
        channels = dict(zip(stage_strides, backbone.layer_channels))
        projections, sources = {}, []
        for stride in strides:
            if stride in channels:
                projections[str(stride)] = nn.Conv2d(channels[stride], transformer.d_model, kernel_size=1)
                sources.append(stage_strides.index(stride))
            elif stride == 2 * backbone.stride:
                projections[str(stride)] = nn.Conv2d(backbone.num_channels, transformer.d_model, kernel_size=3,
                                                     stride=2, padding=1)
                sources.append(len(stage_strides) - 1)
            else:
                raise ValueError(f"stride {stride}: the backbone has {stage_strides} and one stride-2 level past them")
        super().__init__(backbone, transformer, num_classes, num_queries, aux_loss, class_bias_prior,
                         input_proj=nn.ModuleDict(projections))
        self.sources = sources  # the backbone stage each level is made from

    def forward_with_features(self, samples):
        """As DETR's; 'src', 'mask' and 'memory' are per-level lists."""
        if isinstance(samples, (list, tuple)):
            samples = nested_tensor_from_tensor_list(list(samples))
        features = self.backbone[0](samples)  # layer1-4, finest first
        srcs, masks, pos = [], [], []
        for proj, source in zip(self.input_proj.values(), self.sources):
            x, mask = features[source].decompose()
            src = proj(x.masked_fill(mask[:, None], 0.0))  # (B, d, H_l, W_l); no conv reads padding
            mask = F.interpolate(mask[None].float(), size=src.shape[-2:])[0].bool()  # (B, H_l, W_l)
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        extent = image_extent(samples.mask, 1)  # (B, 2) pixels
        hs, box_reference, memory = self.transformer(srcs, masks, self.query_embed.weight, pos, extent)
        return self.predictions(hs, box_reference), {"features": features, "src": srcs, "mask": masks, "hs": hs,
                                                     "memory": memory}


def build_multiscale_detr(joiner: Joiner, strides: Tuple[int, ...], num_classes: int, num_queries: int,
                          dynamic_scale: str, smooth: float, head_mixture: bool, query_mixture: bool,
                          hidden_dim: int, nheads: int, enc_layers: int, dec_layers: int, dim_feedforward: int,
                          dropout: float, pre_norm: bool, prior_impl: str, ms_encoder: str, enc_pattern: str,
                          intra_share: bool, level_embed: bool, scale_select: str, ms_prior: str, aux_loss: bool,
                          class_bias_prior: float) -> MultiScaleDETR:
    """The multi-scale model from typed arguments (their meanings: options.py and docs/multiscale-smca.md)."""
    encoders = {
        "attn": lambda: MultiScaleAttentionEncoder(
            TransformerEncoderLayer(hidden_dim, nheads, dim_feedforward, dropout, pre_norm),
            enc_pattern or "I" * enc_layers, len(strides), intra_share, nn.LayerNorm(hidden_dim) if pre_norm else None),
        "dwconv": lambda: DWConvEncoder(DWConvEncoderLayer(hidden_dim, dim_feedforward, dropout, len(strides)),
                                        enc_layers),
    }
    decoder_strides = tuple(s for s in strides if s >= DECODER_MIN_STRIDE)
    decoder_strides = decoder_strides[:1] * (len(strides) - len(decoder_strides)) + decoder_strides  # 16', 16, ...
    decoder = MultiScaleDecoder(
        MultiScaleDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, pre_norm), dec_layers,
        nn.LayerNorm(hidden_dim), hidden_dim, nheads, num_queries, dynamic_scale, smooth, head_mixture, query_mixture,
        decoder_strides, joiner.stride, ms_prior == "per_level", scale_select == "softmax", prior_impl)
    transformer = MultiScaleTransformer(encoders[ms_encoder](), decoder, hidden_dim, nheads, strides, level_embed)
    return MultiScaleDETR(joiner, transformer, num_classes, num_queries, aux_loss, class_bias_prior)
