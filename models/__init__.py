"""``build_model(args)``: the only place where the argparse namespace meets the model code."""
from models.backbone import build_backbone
from models.criterion import build_criterion
from models.detr import DETR
from models.matcher import build_matcher
from models.position_encoding import build_position_encoding
from models.postprocess import build_postprocessors
from models.postprocess_segm import PostProcessPanoptic, PostProcessSegm
from models.segmentation import DETRsegm
from models.transformer import build_transformer

# the focal-loss classifier starts at this foreground probability (bias = -log((1 - p) / p))
FOCAL_PRIOR_PROB = 0.01


def build_model(args, backbone_weights: str = "none", stuff_ids=None):
    """(model, criterion, postprocessors) for resolved args (see main.resolve_args).

    backbone_weights: 'imagenet', 'none' or a path; main passes 'none' when a checkpoint will overwrite them.
    With --masks the model is DETR's segmentation wrapper (the detector under ``detr.``, frozen with
    --frozen_weights) and the post-processors add 'segm' (masks) and, given the ground truth's stuff category
    ids (``datasets.stuff_ids``), 'panoptic'.
    """
    backbone = build_backbone(args, build_position_encoding(args), backbone_weights)
    model = DETR(backbone, build_transformer(args), num_classes=args.num_classes, num_queries=args.num_queries,
                 aux_loss=not args.no_aux_loss,
                 class_bias_prior=FOCAL_PRIOR_PROB if args.cls_loss == "focal" else 0.0)
    postprocessors = build_postprocessors(args)
    if args.masks:
        model = DETRsegm(model, freeze_detr=bool(args.frozen_weights))
        postprocessors["segm"] = PostProcessSegm()
        if stuff_ids is not None:
            postprocessors["panoptic"] = PostProcessPanoptic(stuff_ids, args.panoptic_threshold, args.cls_loss)
    criterion = build_criterion(args, args.num_classes, build_matcher(args))
    return model, criterion, postprocessors
