"""A detector as an exported graph takes it (export.py, docs/export.md): plain tensors in, a tuple of tensors out.

``DeployModel`` reads one padded batch, images (B, 3, H, W) and mask (B, H, W) True on padding (a mixed-size batch
as nested_tensor_from_tensor_list pads it; all False for same-size images), and returns ``output_names(...)`` in
order: the model's 'pred_logits' (B, Q, C + 1), 'pred_boxes' (B, Q, 4) normalised cxcywh and, for a segmentation
model, 'pred_masks' (B, Q, H/4, W/4); the auxiliary outputs are left out. With ``postprocess`` the graph also
scores the detections, as the post-processor of its classification loss (models/postprocess.py) ranks them:
  ce:    softmax over the C + 1 logits, the best of the C real classes per query: K = Q detections in query order;
  focal: sigmoid of every (query, column) logit and the top K = ``num_select`` pairs, by decreasing score.
It then returns 'scores' (B, K), 'labels' (B, K), 'boxes' (B, K, 4) normalised xyxy (times the image's width and
height: pixels) and 'queries' (B, K) the query of each detection, in place of logits and boxes. Focal pairs in
the no-object column keep label C (a fixed-size graph cannot drop them): the caller drops ``labels == C``.
"""
from typing import Tuple

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy
from util.misc import NestedTensor

RAW_OUTPUTS = ("pred_logits", "pred_boxes")
SCORED_OUTPUTS = ("scores", "labels", "boxes", "queries")
MASK_OUTPUT = "pred_masks"


def output_names(postprocess: bool, masks: bool) -> Tuple[str, ...]:
    """The names of DeployModel's outputs, in order (also the ONNX graph's output names)."""
    return (SCORED_OUTPUTS if postprocess else RAW_OUTPUTS) + ((MASK_OUTPUT,) if masks else ())


def score_softmax(logits: Tensor, boxes: Tensor, num_select: int) -> Tuple[Tensor, ...]:
    """(B, Q, C + 1) logits, (B, Q, 4) boxes -> per query its best real class by softmax (PostProcess)."""
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # (B, Q), (B, Q)
    queries = torch.arange(logits.shape[1], device=logits.device).expand_as(scores)  # (B, Q)
    return scores, labels, box_cxcywh_to_xyxy(boxes), queries


def score_sigmoid_topk(logits: Tensor, boxes: Tensor, num_select: int) -> Tuple[Tensor, ...]:
    """(B, Q, C + 1) logits, (B, Q, 4) boxes -> the top num_select (query, column) sigmoid scores (PostProcessFocal)."""
    columns = logits.shape[-1]
    scores, flat = logits.sigmoid().flatten(1).topk(num_select, dim=1)  # (B, K): query-major index into Q * (C + 1)
    queries, labels = flat // columns, flat % columns  # (B, K), (B, K)
    picked = boxes.gather(1, queries[..., None].expand(-1, -1, boxes.shape[-1]))  # (B, K, 4)
    return scores, labels, box_cxcywh_to_xyxy(picked), queries


SCORERS = {"ce": score_softmax, "focal": score_sigmoid_topk}


class DeployModel(nn.Module):
    """``model`` (a DETR or DETRsegm in eval mode) behind a tensors-only forward; see the module docstring."""

    def __init__(self, model: nn.Module, cls_loss: str, num_select: int, postprocess: bool = False):
        super().__init__()
        self.model = model
        self.masks = hasattr(model, "mask_head")
        self.scorer = SCORERS[cls_loss] if postprocess else None
        self.num_select = num_select

    @property
    def output_names(self) -> Tuple[str, ...]:
        return output_names(self.scorer is not None, self.masks)

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, ...]:
        """images (B, 3, H, W) float, mask (B, H, W) bool True on padding -> the tensors of ``output_names``."""
        out = self.model(NestedTensor(images, mask))
        logits, boxes = out["pred_logits"], out["pred_boxes"]  # (B, Q, C + 1), (B, Q, 4)
        results = (logits, boxes) if self.scorer is None else self.scorer(logits, boxes, self.num_select)
        return results + ((out[MASK_OUTPUT],) if self.masks else ())
