"""Masks and panoptic segmentations from a ``--masks`` model's outputs, as DETR's PostProcessSegm and
PostProcessPanoptic (docs/ablation-modules.md, "Segmentation").

- ``PostProcessSegm`` adds to each detection of the box post-processor its query's mask at the original image
  size (COCO segm AP).
- ``PostProcessPanoptic`` turns one image's queries into a non-overlapping segment map (PQ, pictures).

Both upsample the stride-4 mask logits to the padded canvas of the batch and cut each image out of it, so images
batched with larger ones stay aligned. DETR's panoptic post-processor stretches the whole padded map onto each
image instead; at batch size 1 (DETR's documented evaluation) the two are the same.
"""
from collections import defaultdict
from typing import Collection, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

# DETR: a query joins the panoptic segmentation when its best class (softmax over C+1, no-object included) has
# probability > 0.85. A focal classifier has no competing no-object class; its rule is the one
# cardinality_error_focal counts objects with: the best real-class sigmoid > 0.5.
PANOPTIC_THRESHOLDS = {"ce": 0.85, "focal": 0.5}
# DETR drops segments of at most this many pixels (at the output size) and recomputes the map without them
MIN_SEGMENT_AREA = 4
VOID = 0  # id of unlabelled pixels in a segment map (COCO panoptic's VOID)


def _canvas(target_sizes: Tensor, canvas_size: Optional[Sequence[int]]) -> tuple:
    """The padded (H, W) the masks cover: given, or the largest image of the batch (DETR's max_target_sizes)."""
    if canvas_size is not None:
        return tuple(int(v) for v in canvas_size)
    return tuple(int(v) for v in target_sizes.max(0).values.tolist())


def _upsample_and_cut(masks: Tensor, canvas: tuple, size: Sequence[int]) -> Tensor:
    """(K, h, w) stride-4 logits -> (K, H, W) logits at the image's processed size: bilinear to the canvas, then
    the image's top-left part (images are padded at the bottom/right)."""
    height, width = (int(v) for v in size)
    if len(masks) == 0:  # interpolate refuses an empty channel dimension
        return masks.new_zeros((0, height, width), dtype=torch.float32)
    masks = F.interpolate(masks[None].float(), size=canvas, mode="bilinear", align_corners=False)[0]
    return masks[:, :height, :width]


class PostProcessSegm(nn.Module):
    """Each detection's query mask: sigmoid > threshold at the processed size, then nearest-resized to the original
    size; 'masks' (K, 1, H, W) uint8 on the CPU, in the order of the detections."""

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, results: List[Dict], outputs: Dict, orig_target_sizes: Tensor, target_sizes: Tensor,
                canvas_size: Optional[Sequence[int]] = None) -> List[Dict]:
        """results: the box post-processor's (with 'queries'); outputs['pred_masks'] (B, Q, h, w); target_sizes
        (B, 2) processed (h, w) before padding; orig_target_sizes (B, 2); canvas_size: the padded batch (H, W)
        (default: the largest processed size). Adds 'masks' to every result and returns ``results``."""
        canvas = _canvas(target_sizes, canvas_size)
        for result, masks, size, orig in zip(results, outputs["pred_masks"], target_sizes, orig_target_sizes):
            orig_h, orig_w = (int(v) for v in orig)
            queries = result["queries"]
            if len(queries) == 0:
                result["masks"] = torch.zeros((0, 1, orig_h, orig_w), dtype=torch.uint8)
                continue
            binary = _upsample_and_cut(masks[queries], canvas, size).sigmoid() > self.threshold  # (K, h, w)
            # interpolate takes the K masks as a batch of one-channel images
            binary = F.interpolate(binary[:, None].float(), size=(orig_h, orig_w), mode="nearest")  # (K, 1, H, W)
            result["masks"] = binary.to(torch.uint8).cpu()
        return results


def _ce_selection(logits: Tensor):
    """DETR: softmax over C+1; a query's class is its argmax, kept unless that is the no-object column."""
    scores, labels = logits.softmax(-1).max(-1)
    return scores, labels, labels != logits.shape[-1] - 1


def _focal_selection(logits: Tensor):
    """Sigmoid per class; a query's class is its best real class (the no-object column is never a segment)."""
    scores, labels = logits[..., :-1].sigmoid().max(-1)
    return scores, labels, torch.ones_like(labels, dtype=torch.bool)


SELECTIONS = {"ce": _ce_selection, "focal": _focal_selection}


def _resize_ids(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an id map with PIL, whose sampling DETR's panoptic PNGs have."""
    image = Image.fromarray(ids.astype(np.int32), mode="I").resize((width, height), resample=Image.NEAREST)
    return np.asarray(image, dtype=np.int64)


class PostProcessPanoptic(nn.Module):
    """DETR's panoptic segmentation per image: the confident queries (``cls_loss``'s rule at ``threshold``) each
    claim the pixels where their mask logit is the highest; several queries of one stuff class merge into the first;
    segments of at most MIN_SEGMENT_AREA pixels (at the output size) are dropped and the map is recomputed without
    them, until none is left (DETR's loop; as there, the recomputed maps no longer merge stuff).

    Output per image: 'segments' (H, W) int64 at the target size, 0 = unlabelled (VOID) and k = the k-th entry of
    'segments_info' ({'id', 'category_id', 'isthing', 'area'}), ids 1..K (DETR numbers from 0; PQ is the same).
    ``stuff_ids``: the ground truth's stuff categories (COCO panoptic: 92-200, the complement of DETR's
    is_thing_map); every other class is a thing.
    """

    def __init__(self, stuff_ids: Collection[int], threshold: Optional[float] = None, cls_loss: str = "ce"):
        super().__init__()
        if cls_loss not in SELECTIONS:
            raise ValueError(f"cls_loss must be one of {sorted(SELECTIONS)}, got {cls_loss!r}")
        self.select = SELECTIONS[cls_loss]
        self.threshold = PANOPTIC_THRESHOLDS[cls_loss] if threshold is None else threshold
        self.stuff_ids = frozenset(int(i) for i in stuff_ids)

    def _segment_map(self, masks: Tensor, stuff_groups: List[List[int]], height: int, width: int) -> np.ndarray:
        """masks (K, h, w) logits -> (height, width) map of query indices (0..K-1), -1 where K == 0."""
        if len(masks) == 0:
            return np.full((height, width), -1, dtype=np.int64)
        ids = masks.flatten(1).transpose(0, 1).softmax(-1).argmax(-1).view(masks.shape[-2:])  # (h, w)
        for group in stuff_groups:
            for index in group[1:]:
                ids[ids == index] = group[0]
        return _resize_ids(ids.cpu().numpy(), height, width)

    @torch.no_grad()
    def forward(self, outputs: Dict, processed_sizes: Tensor, target_sizes: Optional[Tensor] = None,
                canvas_size: Optional[Sequence[int]] = None) -> List[Dict]:
        """outputs: 'pred_logits' (B, Q, C+1), 'pred_masks' (B, Q, h, w); processed_sizes (B, 2) the (h, w) given
        to the model before padding; target_sizes (B, 2) the output sizes (default: processed_sizes);
        canvas_size: the padded batch (H, W) (default: the largest processed size)."""
        target_sizes = processed_sizes if target_sizes is None else target_sizes
        canvas = _canvas(processed_sizes, canvas_size)
        scores, labels, real = self.select(outputs["pred_logits"].float())  # (B, Q) each
        keep_all = real & (scores > self.threshold)
        results = []
        for masks, labels_b, keep, size, target in zip(outputs["pred_masks"], labels, keep_all, processed_sizes,
                                                      target_sizes):
            height, width = (int(v) for v in target)
            classes = labels_b[keep].tolist()
            masks = _upsample_and_cut(masks[keep], canvas, size)  # (K, h, w)
            stuff = defaultdict(list)
            for index, label in enumerate(classes):
                if label in self.stuff_ids:
                    stuff[label].append(index)
            groups = [g for g in stuff.values() if len(g) > 1]
            while True:
                ids = self._segment_map(masks, groups, height, width)
                areas = np.bincount(ids[ids >= 0].ravel(), minlength=len(classes))
                small = areas <= MIN_SEGMENT_AREA
                if not small.any():
                    break
                kept = torch.as_tensor(~small, device=masks.device)
                masks, classes, groups = masks[kept], [c for c, s in zip(classes, small) if not s], []
            segments = torch.from_numpy(ids + 1)  # -1 (no query) becomes VOID
            info = [{"id": index + 1, "category_id": label, "isthing": label not in self.stuff_ids,
                     "area": int(area)} for index, (label, area) in enumerate(zip(classes, areas))]
            results.append({"segments": segments, "segments_info": info})
        return results


__all__ = ["PostProcessSegm", "PostProcessPanoptic", "PANOPTIC_THRESHOLDS", "VOID"]
