"""torch.hub entries, as DETR's, plus SMCA.

    model, postprocessor = torch.hub.load("REPO_OR_DIR", "detr_resnet50", pretrained=True, return_postprocessor=True)

``detr_resnet50``, ``detr_resnet50_dc5``, ``detr_resnet101``, ``detr_resnet101_dc5``: DETR's architectures;
``pretrained=True`` loads DETR's published COCO weights (downloaded once into the torch.hub cache).
``pretrained=False`` keeps DETR hub's meaning: a model ready to train, whose ResNet starts from torchvision's
ImageNet weights (downloaded); pass ``backbone_weights="none"`` for a fully random model that needs no network.
``smca_resnet50``: the SMCA research setting (ResNet-50, 300 queries, focal classifier), built fresh or loaded
from a checkpoint of this fork. Class names of a checkpoint: ``inference.load_detector(...).class_names``; of
COCO (DETR's label space): the ``coco_class_names`` entry.
"""
import os

from datasets.class_names import COCO_CLASS_NAMES
from inference import DETR_CHECKPOINTS, load_detector
from models import build_detr, build_postprocessor
from rundir.checkpoint import hub_cache_path
from util.errors import UserError

dependencies = ["torch", "torchvision", "scipy", "pycocotools"]


def _build(return_postprocessor: bool, cls_loss: str, backbone_weights: str, **architecture):
    try:
        model = build_detr(**architecture, cls_loss=cls_loss, backbone_weights=backbone_weights)
    except UserError as e:
        raise UserError(f"{e} (in Python: backbone_weights='none' or a path)") from None
    return (model, build_postprocessor(cls_loss, model.num_queries)) if return_postprocessor else model


def _detr(entry: str, pretrained: bool, num_classes: int, return_postprocessor: bool, backbone_weights: str):
    url, architecture = DETR_CHECKPOINTS[entry]
    if not pretrained:
        return _build(return_postprocessor, "ce", backbone_weights, num_classes=num_classes, **architecture)
    if num_classes != 91:
        raise UserError(f"{entry}(pretrained=True) has COCO's 91 class ids, not num_classes={num_classes}; "
                        f"fine-tune with main.py --finetune_from {url} --num_classes {num_classes}")
    detector = load_detector(url, check_hash=True, offline_hint=(
        f"download it elsewhere and put it at {hub_cache_path(url)} (torch.hub's cache), then call again"),
        **architecture)
    return (detector.model, detector.postprocessor) if return_postprocessor else detector.model


def detr_resnet50(pretrained=False, num_classes=91, return_postprocessor=False, backbone_weights="imagenet"):
    """DETR R50 (42.0 AP on COCO val5k with DETR's weights)."""
    return _detr("detr_resnet50", pretrained, num_classes, return_postprocessor, backbone_weights)


def detr_resnet50_dc5(pretrained=False, num_classes=91, return_postprocessor=False, backbone_weights="imagenet"):
    """DETR R50 with a dilated last stage (DC5; 43.3 AP). Run it on one image per batch: padding costs AP."""
    return _detr("detr_resnet50_dc5", pretrained, num_classes, return_postprocessor, backbone_weights)


def detr_resnet101(pretrained=False, num_classes=91, return_postprocessor=False, backbone_weights="imagenet"):
    """DETR R101 (43.5 AP)."""
    return _detr("detr_resnet101", pretrained, num_classes, return_postprocessor, backbone_weights)


def detr_resnet101_dc5(pretrained=False, num_classes=91, return_postprocessor=False, backbone_weights="imagenet"):
    """DETR R101 DC5 (44.9 AP). Run it on one image per batch: padding costs AP."""
    return _detr("detr_resnet101_dc5", pretrained, num_classes, return_postprocessor, backbone_weights)


def smca_resnet50(dynamic_scale="type2", head_mixture=False, query_mixture=False, smooth=8, num_queries=300,
                  checkpoint=None, num_classes=91, return_postprocessor=False, backbone_weights="imagenet",
                  trust_checkpoint=False):
    """SMCA-DETR R50 with a focal classifier (docs/ablation-modules.md).

    ``checkpoint``: a path or URL of a checkpoint written by main.py; its stored configuration decides the
    architecture, and an argument given a non-default value that contradicts it is an error. Without one, a
    fresh model (ImageNet ResNet unless ``backbone_weights='none'``)."""
    architecture = dict(backbone="resnet50", dynamic_scale=dynamic_scale, head_mixture=head_mixture,
                        query_mixture=query_mixture, smooth=float(smooth), num_queries=num_queries,
                        num_classes=num_classes)
    if checkpoint is None:
        return _build(return_postprocessor, "focal", backbone_weights, **architecture)
    defaults = dict(backbone="resnet50", dynamic_scale="type2", head_mixture=False, query_mixture=False, smooth=8.0,
                    num_queries=300, num_classes=91)
    passed = {k: v for k, v in architecture.items() if v != defaults[k]}
    detector = load_detector(os.fspath(checkpoint), trust=trust_checkpoint, **passed)
    return (detector.model, detector.postprocessor) if return_postprocessor else detector.model


def coco_class_names():
    """{category id: name} of COCO's 80 categories under DETR's 91 class ids (1..90; ten ids are unused)."""
    return dict(COCO_CLASS_NAMES)
