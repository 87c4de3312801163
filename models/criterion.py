"""Set-prediction losses: match queries to targets, then score the matched pairs.

Loss names (the `losses` list of SetCriterion) and the keys they produce:

- 'labels':       'loss_ce' = softmax cross-entropy over C+1 classes (DETR),
                  the no-object class weighted by eos_coef; logs 'class_error'.
- 'labels_focal': 'loss_ce' = sigmoid focal loss over all queries and all C+1
                  logits (SMCA research code); logs 'class_error'. The key stays
                  'loss_ce' so weight_dict and logs are the same for both
                  variants: under focal, 'loss_ce' holds the focal loss.
- 'boxes':        'loss_bbox' (L1 on cxcywh) and 'loss_giou' (1 - GIoU).
- 'cardinality':  'cardinality_error', logged only (no gradient).
- 'cardinality_focal': 'cardinality_error_focal', logged only (focal runs).
- 'masks':        'loss_mask' (sigmoid focal, alpha 0.25, gamma 2) and 'loss_dice'
                  on the matched queries' 'pred_masks' (DETR's segmentation losses);
                  final decoder layer only (FINAL_LAYER_ONLY), as DETR.

Logged metrics keep upstream's definitions, so log.txt curves compare with
DETR's and the original SMCA code's published logs (both loss types):
'class_error' = 100 - top-1 accuracy over all C+1 logits of the matched
queries (100 for a batch without targets, as DETR's accuracy() gives 0 then);
'cardinality_error' = mean |#queries whose argmax is not the no-object column
- #targets| per image. Under focal that count says little: no column is ever
trained towards 1 for unmatched queries, so most argmaxes land on a real
class. 'cardinality_error_focal' is the count that means something there:
queries whose best real-class probability exceeds 0.5.

Every summed loss is divided by the number of target boxes averaged over
workers, so each worker's gradient has the same scale as single-process
training. Intermediate decoder layers ('aux_outputs') get the same losses
with the suffix _{layer index}.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from util.dist import get_world_size, is_dist_avail_and_initialized

# losses computed on the last decoder layer only: the aux layers have no masks (DETR: "too costly")
FINAL_LAYER_ONLY = frozenset({"masks"})
# DETR's mask focal loss: its own constants, independent of --focal_alpha/--focal_gamma (classification)
MASK_FOCAL_ALPHA, MASK_FOCAL_GAMMA = 0.25, 2.0


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise focal loss (Lin et al. 2017) of independent sigmoids, same shape as logits.

    alpha weighs positives (1 - alpha negatives); (1 - p_t)^gamma down-weights easy examples.
    """
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob_true = prob * targets + (1 - prob) * (1 - targets)
    alpha_true = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_true * (1 - prob_true) ** gamma * bce


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-mask DICE loss 1 - (2 |p t| + 1) / (|p| + |t| + 1) of sigmoid probabilities p; (N, P) -> (N,)."""
    prob = logits.sigmoid()
    return 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)


def _padded_masks(targets: list[dict]) -> Tensor:
    """Every image's 'masks' (T_b, H_b, W_b) zero-padded at the bottom/right into one (B, max T, max H, max W)
    tensor: the padded canvas of the image batch, since masks have their image's size."""
    masks = [t["masks"] for t in targets]
    shape = (len(masks), max(len(m) for m in masks), max(m.shape[-2] for m in masks), max(m.shape[-1] for m in masks))
    padded = masks[0].new_zeros(shape)
    for canvas, m in zip(padded, masks):
        canvas[: m.shape[0], : m.shape[1], : m.shape[2]].copy_(m)
    return padded


@torch.no_grad()
def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Top-1 accuracy in percent; logits (N, K), labels (N,). No targets count as 0%, as DETR's accuracy()."""
    if labels.numel() == 0:
        return torch.zeros((), device=logits.device)
    return (logits.argmax(-1) == labels).float().mean() * 100


class SetCriterion(nn.Module):
    """DETR's set criterion with the classification loss chosen by name ('labels' or 'labels_focal')."""

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: dict[str, float],
        losses: list[str],
        eos_coef: float,
        focal_alpha: float,
        focal_gamma: float,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.loss_map = {
            "labels": self.loss_labels,
            "labels_focal": self.loss_labels_focal,
            "boxes": self.loss_boxes,
            "cardinality": self.loss_cardinality,
            "cardinality_focal": self.loss_cardinality_focal,
            "masks": self.loss_masks,
        }
        unknown = [name for name in losses if name not in self.loss_map]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; known: {sorted(self.loss_map)}")
        self.losses = list(losses)
        # The no-object class (index num_classes) is down-weighted in the
        # softmax CE because most queries are unmatched.
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight)

    # -- losses: each takes (outputs, targets, indices, num_boxes, log) and returns a dict --

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        logits = outputs["pred_logits"].float()  # (B, Q, C+1)
        matched = self._query_index(indices)
        labels = self._matched_labels(targets, indices)  # (N,)
        # Every query's class: its matched target's label, or num_classes (no object).
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[matched] = labels  # (B, Q)
        # cross_entropy wants the class dimension second: (B, C+1, Q). It is a
        # weighted mean over queries (DETR), so num_boxes is not used here.
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.class_weight)
        losses = {"loss_ce": loss}
        if log:
            losses["class_error"] = 100 - _accuracy(logits[matched], labels)
        return losses

    def loss_labels_focal(self, outputs, targets, indices, num_boxes, log=True):
        logits = outputs["pred_logits"].float()  # (B, Q, C+1)
        matched = self._query_index(indices)
        labels = self._matched_labels(targets, indices)  # (N,)
        # Matched queries: 1 at their class. Unmatched queries: all zeros, i.e.
        # "no object" is the absence of any positive, not a class of its own
        # (the last column is trained towards 0 like every negative).
        onehot = torch.zeros_like(logits)  # (B, Q, C+1)
        onehot[matched + (labels,)] = 1.0
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_boxes
        losses = {"loss_ce": loss}
        if log:
            # the original SMCA code's definition: DETR's, over all C+1 logits
            losses["class_error"] = 100 - _accuracy(logits[matched], labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes, log=True):
        """Absolute error between the number of queries whose argmax is not the no-object column and the
        number of targets, per image (DETR's and the original SMCA code's definition; logged only)."""
        logits = outputs["pred_logits"]  # (B, Q, C+1)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()  # (B,)
        return {"cardinality_error": F.l1_loss(predicted, self._target_counts(targets, logits.device))}

    @torch.no_grad()
    def loss_cardinality_focal(self, outputs, targets, indices, num_boxes, log=True):
        """The same error counting queries whose best real-class sigmoid exceeds 0.5 (logged only)."""
        logits = outputs["pred_logits"]  # (B, Q, C+1)
        predicted = (logits[..., : self.num_classes].sigmoid().amax(-1) > 0.5).sum(1).float()  # (B,)
        return {"cardinality_error_focal": F.l1_loss(predicted, self._target_counts(targets, logits.device))}

    def loss_boxes(self, outputs, targets, indices, num_boxes, log=True):
        matched = self._query_index(indices)
        src_boxes = outputs["pred_boxes"][matched].float()  # (N, 4) cxcywh
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()  # (N, 4)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def loss_masks(self, outputs, targets, indices, num_boxes, log=True):
        """DETR's mask losses: the matched queries' mask logits, upsampled (bilinear) from stride 4 to the padded
        canvas, against the targets' 'masks'; summed per mask and divided by num_boxes. As DETR, padded pixels
        count as background."""
        src = outputs["pred_masks"][self._query_index(indices)]  # (N, H/4, W/4)
        image = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        target = _padded_masks(targets)[image, torch.cat([tgt for _, tgt in indices])].to(src)  # (N, H, W)
        src = F.interpolate(src[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        src, target = src.flatten(1).float(), target.flatten(1)  # (N, H*W)
        focal = sigmoid_focal_loss(src, target, MASK_FOCAL_ALPHA, MASK_FOCAL_GAMMA).mean(1)  # (N,)
        return {"loss_mask": focal.sum() / num_boxes, "loss_dice": dice_loss(src, target).sum() / num_boxes}

    # -- helpers --

    @staticmethod
    def _query_index(indices) -> tuple[Tensor, Tensor]:
        """(image index, query index) of every matched query, for advanced indexing of (B, Q, ...)."""
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query = torch.cat([src for src, _ in indices])
        return batch, query

    @staticmethod
    def _target_counts(targets: list[dict], device: torch.device) -> Tensor:
        return torch.as_tensor([len(t["labels"]) for t in targets], dtype=torch.float, device=device)

    @staticmethod
    def _matched_labels(targets: list[dict], indices) -> Tensor:
        """(N,) labels of the matched targets, in the order of _query_index."""
        return torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])

    def _match(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Matcher indices (returned on the CPU) moved to the predictions' device for indexing."""
        device = outputs["pred_logits"].device
        return [(src.to(device), tgt.to(device)) for src, tgt in self.matcher(outputs, targets)]

    def _num_boxes(self, targets: list[dict], device: torch.device) -> float:
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(num_boxes)
        return torch.clamp(num_boxes / get_world_size(), min=1).item()

    def get_loss(self, name: str, outputs, targets, indices, num_boxes, log=True) -> dict[str, Tensor]:
        return self.loss_map[name](outputs, targets, indices, num_boxes, log=log)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """outputs: 'pred_logits' (B, Q, C+1), 'pred_boxes' (B, Q, 4), optional 'aux_outputs' list of such dicts.
        targets: B dicts with 'labels' (T_b,) and 'boxes' (T_b, 4) normalized cxcywh.

        Returns the unweighted losses and logged metrics; weight with self.weight_dict.
        """
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)

        indices = self._match(final, targets)
        losses = {}
        for name in self.losses:
            losses.update(self.get_loss(name, final, targets, indices, num_boxes))

        for layer, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self._match(aux, targets)
            for name in self.losses:
                if name in FINAL_LAYER_ONLY:
                    continue
                # class_error of intermediate layers is not logged (DETR does the same).
                layer_losses = self.get_loss(name, aux, targets, aux_indices, num_boxes, log=False)
                losses.update({f"{k}_{layer}": v for k, v in layer_losses.items()})
        return losses


def weighted(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> dict[str, Tensor]:
    """The losses that have a weight, each times its weight (in the order of ``losses``); their sum is the loss
    a step minimises. Takes any criterion's ``weight_dict`` (the benchmarks also run other code's criteria)."""
    return {k: v * weight_dict[k] for k, v in losses.items() if k in weight_dict}


def build_criterion(args, num_classes: int, matcher: nn.Module) -> SetCriterion:
    """args.cls_loss is already resolved to 'ce' or 'focal', and the loss coefficients to floats."""
    final_weights = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    weight_dict = dict(final_weights)
    if not args.no_aux_loss:
        # One copy per intermediate decoder layer; the last layer is the un-suffixed output.
        for layer in range(args.dec_layers - 1):
            weight_dict.update({f"{k}_{layer}": v for k, v in final_weights.items()})
    if args.masks:
        weight_dict.update({"loss_mask": args.mask_loss_coef, "loss_dice": args.dice_loss_coef})
    class_losses = {"ce": ["labels"], "focal": ["labels_focal", "cardinality_focal"]}
    if args.cls_loss not in class_losses:
        raise ValueError(
            f"build_criterion: --cls_loss must be resolved to one of {sorted(class_losses)}, got {args.cls_loss!r}"
        )
    return SetCriterion(
        num_classes,
        matcher=matcher,
        weight_dict=weight_dict,
        losses=[*class_losses[args.cls_loss], "boxes", "cardinality", *(["masks"] if args.masks else [])],
        eos_coef=args.eos_coef,
        focal_alpha=args.focal_alpha,
        focal_gamma=args.focal_gamma,
    )
