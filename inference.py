"""A trained detector, ready to run on images: model, post-processor, class names and input transform from one
checkpoint (this fork's, or DETR's published COCO checkpoints).

    detector = load_detector("outputs/demo/checkpoint.pth")
    results = detector([PIL.Image.open("a.jpg")])  # per image: 'scores', 'labels', 'boxes' (xyxy pixels)

The architecture comes from the checkpoint: its stored configuration, or for DETR's official files (which store
none) from the weights (rundir/run_config.infer_official_config). predict.py and hubconf.py build on this.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import datasets
from datasets.class_names import default_class_names
from datasets.coco_panoptic import COCO_PANOPTIC_NUM_CLASSES, COCO_PANOPTIC_STUFF_IDS
from models import build_detr, build_postprocessor, detr_kwargs
from models.postprocess_segm import PostProcessPanoptic
from options import ARCH_FLAGS, get_args_parser, resolve_loss
from rundir import run_config
from rundir.checkpoint import load_checkpoint
from rundir.model_weights import load_model_weights
from util.errors import UserError
from util.misc import as_nested_tensor, nested_tensor_from_tensor_list

DETR_URL = "https://dl.fbaipublicfiles.com/detr/"
# DETR's published COCO checkpoints: hub entry -> (URL, the architecture flags the weights cannot tell)
DETR_CHECKPOINTS = {
    "detr_resnet50": (DETR_URL + "detr-r50-e632da11.pth", {"backbone": "resnet50", "dilation": False}),
    "detr_resnet50_dc5": (DETR_URL + "detr-r50-dc5-f0fb7ef5.pth", {"backbone": "resnet50", "dilation": True}),
    "detr_resnet101": (DETR_URL + "detr-r101-2c7b67e5.pth", {"backbone": "resnet101", "dilation": False}),
    "detr_resnet101_dc5": (DETR_URL + "detr-r101-dc5-a2e86def.pth", {"backbone": "resnet101", "dilation": True}),
}

# per-query score and class, as the post-processor of each loss scores them: softmax over the C + 1 logits
# with no-object left out (ce), sigmoid of the C class logits (focal); (B, Q, C + 1) -> (B, Q), (B, Q)
QUERY_SCORES: Dict[str, Callable[[Tensor], tuple]] = {
    "ce": lambda logits: logits.float().softmax(-1)[..., :-1].max(-1),
    "focal": lambda logits: logits.float()[..., :-1].sigmoid().max(-1),
}


# the key of the metadata export.py stores in an exported file: what a Detector needs besides the graph (JSON)
EXPORT_METADATA_KEY = "smca_detr"
# how to get the export extra (pyproject.toml), for the one-line errors where it is missing
EXPORT_INSTALL_HINT = "pip install -e .[export] (or pip install -r requirements-export.txt)"


class ExportedModel:
    """A graph exported by export.py behind the model's call: samples (any of DETR's input forms) -> a dict of
    its named outputs as CPU tensors. ``run(images, mask)`` runs the graph on numpy arrays."""
    device = torch.device("cpu")

    def __init__(self, run: Callable, output_names: Sequence[str]):
        self.run = run
        self.output_names = tuple(output_names)

    def __call__(self, samples) -> Dict[str, Tensor]:
        images, mask = as_nested_tensor(samples, channels=3).decompose()  # (B, 3, H, W), (B, H, W)
        outputs = self.run(images.cpu().float().numpy(), mask.cpu().numpy())
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}


@dataclass
class Detector:
    """Everything needed to turn images into named detections."""
    model: nn.Module  # in eval mode, on its device
    postprocessor: nn.Module
    class_names: Optional[Dict[int, str]]  # {category id: name}; None when the checkpoint cannot tell
    transform: Callable  # PIL image -> normalised (3, H, W) model input (the run's validation transform)
    config: dict  # the checkpoint's stored flags (none for DETR's files) with the architecture flags as built
    source: str  # the checkpoint path or URL
    # segmentation checkpoints (--masks): the panoptic post-processor (outputs, processed sizes, target sizes);
    # None for detectors, and for a segmentation checkpoint that does not say which classes are stuff
    panoptic: Optional[nn.Module] = None

    @property
    def device(self) -> torch.device:
        if isinstance(self.model, ExportedModel):
            return self.model.device
        return next(self.model.parameters()).device

    @property
    def cls_loss(self) -> str:
        return self.config["cls_loss"]

    def describe(self) -> str:
        c = self.config
        prior = "plain DETR" if c["dynamic_scale"] == "none" else f"SMCA {c['dynamic_scale']}"
        if c.get("ms_levels", "none") != "none":
            prior += f" multi-scale {c['ms_levels']}"
        return (f"{c['backbone']}{' DC5' if c['dilation'] else ''}, {prior}, {c['num_queries']} queries, "
                f"{c['num_classes']} class ids, {c['cls_loss']} classifier, from {self.source}")

    @torch.no_grad()
    def __call__(self, images: Sequence) -> List[Dict[str, Tensor]]:
        """PIL images -> per image 'scores' (K,), 'labels' (K,) category ids, 'boxes' (K, 4) absolute xyxy in
        that image's pixels (the post-processor's output; several images are padded into one batch)."""
        samples = nested_tensor_from_tensor_list([self.transform(image) for image in images]).to(self.device)
        sizes = torch.tensor([[image.height, image.width] for image in images], device=self.device)
        return self.postprocessor(self.model(samples), sizes)

    def query_scores(self, logits: Tensor) -> tuple:
        """(B, Q, C + 1) logits -> the best class's score (B, Q) and that class (B, Q) of every query."""
        return QUERY_SCORES[self.cls_loss](logits)


def load_detector(checkpoint: str, device: str = "cpu", trust: bool = False, check_hash: bool = False,
                  offline_hint: Optional[str] = None, **architecture) -> Detector:
    """A ready Detector from a checkpoint path or URL.

    ``architecture``: main.py's architecture flags (options.ARCH_FLAGS), for what a checkpoint cannot tell:
    a value that contradicts the checkpoint is a UserError. A DETR file whose name contains 'dc5' is built
    dilated. A segmentation checkpoint (``--masks``, DETR's panoptic files) gives the segmentation model, whose
    outputs the box post-processor reads as a detector's, and ``panoptic``, its panoptic post-processor (stuff
    classes: stored by main.py; COCO panoptic's for DETR's files). ``trust`` allows checkpoints that need full unpickling (main.py's --trust_checkpoint);
    ``check_hash`` and ``offline_hint`` are rundir.checkpoint.load_checkpoint's. Bad files raise UserError.
    """
    unknown = sorted(set(architecture) - set(ARCH_FLAGS))
    if unknown:
        raise TypeError(f"load_detector: {unknown} are not architecture flags (options.ARCH_FLAGS)")
    hint = {} if offline_hint is None else {"offline_hint": offline_hint}
    ckpt = load_checkpoint(checkpoint, trust=trust, check_hash=check_hash, **hint)
    state = ckpt.get("model")
    if not isinstance(state, dict) or not state:
        raise UserError(f"{checkpoint} holds no model weights ('model' entry; it has {sorted(ckpt)[:6]}); "
                        f"pass a checkpoint written by main.py or one of DETR's")
    args = get_args_parser().parse_args([])
    vars(args).update(architecture)
    stored = ckpt.get("config")
    if stored:
        run_config.reconcile_config(args, set(architecture), stored, ARCH_FLAGS, checkpoint)
        args.num_detections = stored.get("num_detections")  # the run's cap on detections per image
    else:
        if "dilation" not in architecture:
            args.dilation = "dc5" in os.path.basename(checkpoint).lower()
        run_config.infer_official_config(state, checkpoint, args, set(architecture))
    resolve_loss(args)
    if args.num_classes is None:
        raise UserError(f"{checkpoint} does not say its number of classes (no num_classes in its config, no "
                        f"class_embed weights)")
    model = build_detr(**{**detr_kwargs(vars(args)), "aux_loss": False, "freeze_detector": False})
    load_model_weights(model, state)
    model.to(device).eval()
    dataset_file = stored.get("dataset_file") if stored else None
    class_names = ckpt.get("class_names") or default_class_names(dataset_file, args.num_classes)
    transform = datasets.eval_transform(stored)
    postprocessor = build_postprocessor(args.cls_loss, args.num_queries, args.num_detections)
    stuff = ckpt.get("stuff_ids")
    if stuff is None and dataset_file in (None, "coco_panoptic") and args.num_classes == COCO_PANOPTIC_NUM_CLASSES:
        stuff = COCO_PANOPTIC_STUFF_IDS  # DETR's panoptic files store no configuration
    panoptic = None
    if args.masks and stuff is not None:
        panoptic = PostProcessPanoptic(stuff, (stored or {}).get("panoptic_threshold"), args.cls_loss)
    return Detector(model=model, postprocessor=postprocessor,
                    class_names=None if class_names is None else {int(k): str(v) for k, v in class_names.items()},
                    transform=transform, config={**(stored or {}), **{f: getattr(args, f) for f in ARCH_FLAGS}},
                    source=checkpoint, panoptic=panoptic)


def export_metadata(detector: Detector, output_names: Sequence[str]) -> str:
    """What load_onnx_detector needs besides the graph, as JSON: the configuration, class names, the panoptic
    post-processor's stuff ids and threshold (None for a detector), the source and the graph's output names."""
    panoptic = detector.panoptic
    return json.dumps({"config": detector.config, "class_names": detector.class_names, "source": detector.source,
                       "stuff_ids": None if panoptic is None else sorted(panoptic.stuff_ids),
                       "panoptic_threshold": None if panoptic is None else panoptic.threshold,
                       "outputs": list(output_names)}, default=str)


def load_onnx_detector(path: str) -> Detector:
    """A Detector whose model is an ONNX file written by export.py, run by onnxruntime on the CPU: the same
    post-processors, class names and input transform as the checkpoint it came from (stored in the file)."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError(f"running an ONNX model needs onnx and onnxruntime: {EXPORT_INSTALL_HINT}") from None
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # a missing file, or protobuf errors of several types
        raise UserError(f"--onnx {path}: cannot read it as an ONNX model ({type(e).__name__}: {e})") from None
    stored = {p.key: p.value for p in proto.metadata_props}.get(EXPORT_METADATA_KEY)
    if stored is None:
        raise UserError(f"--onnx {path} was not written by export.py (no '{EXPORT_METADATA_KEY}' metadata): "
                        f"export it with python export.py --format onnx")
    meta = json.loads(stored)
    if "pred_logits" not in meta["outputs"]:
        raise UserError(f"--onnx {path} was exported with --postprocess; predict.py reads the raw outputs: "
                        f"export it again without --postprocess")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(images, mask):
        return session.run(list(meta["outputs"]), {"images": images, "mask": mask})

    config = meta["config"]
    panoptic = None
    if meta["stuff_ids"] is not None:
        panoptic = PostProcessPanoptic(meta["stuff_ids"], meta["panoptic_threshold"], config["cls_loss"])
    class_names = meta["class_names"]
    return Detector(model=ExportedModel(run, meta["outputs"]),
                    postprocessor=build_postprocessor(config["cls_loss"], config["num_queries"],
                                                      config.get("num_detections")),
                    class_names=None if class_names is None else {int(k): v for k, v in class_names.items()},
                    transform=datasets.eval_transform(config), config=config, source=path, panoptic=panoptic)
