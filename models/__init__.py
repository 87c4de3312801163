"""Model builders with typed keyword arguments (``build_detr``, ``build_postprocessor``), and ``build_model(args)``:
the only place where the argparse namespace meets the model code, a translation of the flags onto them."""
from collections.abc import Mapping

from torch import nn

from models.backbone import Backbone, Joiner
from models.criterion import build_criterion
from models.detr import DETR
from models.matcher import build_matcher
from models.ms_detr import build_multiscale_detr
from models.position_encoding import build_position_encoding
from models.postprocess import build_postprocessor, build_postprocessors  # noqa: F401 (build_postprocessor: API)
from models.postprocess_segm import PostProcessPanoptic, PostProcessSegm
from models.segmentation import DETRsegm
from models.transformer import Transformer

# the focal-loss classifier starts at this foreground probability (bias = -log((1 - p) / p))
FOCAL_PRIOR_PROB = 0.01
CLS_LOSSES = ("ce", "focal")


def build_detr(backbone: str = "resnet50", dilation: bool = False, num_classes: int = 91, num_queries: int = 100,
               dynamic_scale: str = "none", smooth: float = 8.0, head_mixture: bool = False,
               query_mixture: bool = False, cls_loss: str = "auto", hidden_dim: int = 256, nheads: int = 8,
               enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
               pre_norm: bool = False, position_embedding: str = "sine", backbone_norm: str = "frozen",
               backbone_weights: str = "none", train_backbone: bool = True, aux_loss: bool = True,
               prior_impl: str = "fused", masks: bool = False, freeze_detector: bool = False,
               mask_attention: str = "detr",
               ms_levels: str = "none", ms_encoder: str = "attn", enc_pattern: str = "", intra_share: bool = True,
               level_embed: bool = True, scale_select: str = "softmax", ms_prior: str = "shared") -> nn.Module:
    """DETR, or SMCA-DETR with ``dynamic_scale`` type1-4; the defaults are DETR's (R50, 100 queries, COCO's 91 ids).

    The arguments mean what main.py's flags of the same names mean (options.py; the SMCA ones are specified in
    docs/ablation-modules.md). ``cls_loss`` only sets the classifier's initial bias (focal: foreground
    probability FOCAL_PRIOR_PROB); 'auto' is focal with a spatial prior, ce without. ``backbone_weights``:
    'none' (random), 'imagenet' (torchvision's download) or a path to a ResNet state dict.
    ``train_backbone=False`` freezes the whole ResNet (main.py: ``--lr_backbone 0``). ``prior_impl``: how the
    co-attention adds the prior, 'fused' or 'explicit' (same logits, same weights; models/spatial_prior.py).
    ``masks``: DETR's segmentation model (DETRsegm: the detector under ``detr.`` and the mask head, fed by
    layer1-4); ``freeze_detector`` then trains the mask head alone (main.py: ``--frozen_weights``), and
    ``mask_attention`` ('detr' or 'scaled') picks the attention map the head reads (models/segmentation.py).
    ``ms_levels`` ('none' or strides like '16,32,64') and the ``ms_*``, ``enc_pattern``, ``intra_share``,
    ``level_embed``, ``scale_select`` arguments: multi-scale SMCA (docs/multiscale-smca.md, models/ms_detr.py).
    """
    # the position encoding first: a learned one draws from the generator before the ResNet, as before
    position = build_position_encoding(position_embedding, hidden_dim)
    multiscale = ms_levels != "none"
    joiner = Joiner(Backbone(backbone, train_backbone, dilation, backbone_weights, norm=backbone_norm,
                             return_interm_layers=masks or multiscale), position)
    focal = resolve_cls_loss(cls_loss, dynamic_scale) == "focal"
    class_bias_prior = FOCAL_PRIOR_PROB if focal else 0.0
    if multiscale:
        return build_multiscale_detr(
            joiner, strides=tuple(int(s) for s in ms_levels.split(",")), num_classes=num_classes,
            num_queries=num_queries, dynamic_scale=dynamic_scale, smooth=smooth, head_mixture=head_mixture,
            query_mixture=query_mixture, hidden_dim=hidden_dim, nheads=nheads, enc_layers=enc_layers,
            dec_layers=dec_layers, dim_feedforward=dim_feedforward, dropout=dropout, pre_norm=pre_norm,
            prior_impl=prior_impl, ms_encoder=ms_encoder, enc_pattern=enc_pattern, intra_share=bool(intra_share),
            level_embed=bool(level_embed), scale_select=scale_select, ms_prior=ms_prior, aux_loss=aux_loss,
            class_bias_prior=class_bias_prior)
    transformer = Transformer(d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers,
                              num_decoder_layers=dec_layers, dim_feedforward=dim_feedforward, dropout=dropout,
                              normalize_before=pre_norm, num_queries=num_queries, dynamic_scale=dynamic_scale,
                              smooth=smooth, head_mixture=head_mixture, query_mixture=query_mixture,
                              prior_impl=prior_impl)
    detr = DETR(joiner, transformer, num_classes=num_classes, num_queries=num_queries, aux_loss=aux_loss,
                class_bias_prior=class_bias_prior)
    return DETRsegm(detr, freeze_detr=freeze_detector, attention=mask_attention) if masks else detr


def resolve_cls_loss(cls_loss: str, dynamic_scale: str) -> str:
    """'auto' -> focal with a spatial prior, ce without (main.py's --cls_loss auto); 'ce'/'focal' unchanged."""
    if cls_loss == "auto":
        return "ce" if dynamic_scale == "none" else "focal"
    if cls_loss not in CLS_LOSSES:
        raise ValueError(f"cls_loss must be 'auto' or one of {CLS_LOSSES}, got {cls_loss!r}")
    return cls_loss


# main.py's flags that build_detr takes under the same name
DETR_FLAGS = ("backbone", "dilation", "num_classes", "num_queries", "dynamic_scale", "smooth", "head_mixture",
              "query_mixture", "cls_loss", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward",
              "dropout", "pre_norm", "position_embedding", "backbone_norm", "prior_impl", "masks", "mask_attention",
              "ms_levels", "ms_encoder", "enc_pattern", "intra_share", "level_embed", "scale_select", "ms_prior")


def detr_kwargs(flags: Mapping) -> dict:
    """build_detr's keyword arguments from main.py's resolved flags: ``vars(args)`` or a checkpoint's 'config'."""
    kwargs = {name: flags[name] for name in DETR_FLAGS}
    kwargs["train_backbone"] = flags["lr_backbone"] > 0
    kwargs["aux_loss"] = not flags["no_aux_loss"]
    kwargs["freeze_detector"] = bool(flags.get("frozen_weights"))
    return kwargs


def build_model(args, backbone_weights: str = "none", stuff_ids=None):
    """(model, criterion, postprocessors) for resolved args (see run_setup.resolve_args).

    backbone_weights: 'imagenet', 'none' or a path; main passes 'none' when a checkpoint will overwrite them.
    With --masks the model is DETR's segmentation wrapper (the detector under ``detr.``, frozen with
    --frozen_weights) and the post-processors add 'segm' (masks) and, given the ground truth's stuff category
    ids (``datasets.stuff_ids``), 'panoptic'.
    """
    model = build_detr(**detr_kwargs(vars(args)), backbone_weights=backbone_weights)
    postprocessors = build_postprocessors(args)
    if args.masks:
        postprocessors["segm"] = PostProcessSegm()
        if stuff_ids is not None:
            postprocessors["panoptic"] = PostProcessPanoptic(stuff_ids, args.panoptic_threshold, args.cls_loss)
    criterion = build_criterion(args, args.num_classes, build_matcher(args))
    return model, criterion, postprocessors
