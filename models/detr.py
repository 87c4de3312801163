"""The DETR detector: backbone -> input projection -> transformer -> class and box heads."""
import math
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from models.backbone import Joiner, image_extent
from models.spatial_prior import MLP
from models.transformer import Transformer
from util.misc import NestedTensor, as_nested_tensor


class DETR(nn.Module):
    """Parameter names are DETR's (``class_embed``, ``bbox_embed``, ``query_embed``, ``input_proj``,
    ``backbone``, ``transformer``), so official checkpoints load with ``strict=True`` for default flags."""

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, class_bias_prior: float = 0.0, input_proj: nn.Module = None):
        """num_classes: the largest class id + 1 (DETR's convention); the classifier has num_classes + 1
        outputs, the last being "no object". class_bias_prior > 0 sets the classifier bias to
        -log((1 - prior) / prior) (the focal-loss initialisation); 0 keeps PyTorch's default. input_proj: the
        projection of the backbone's features (default: DETR's 1x1 conv of the last map; multi-scale passes one
        per level, models/ms_detr.py)."""
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if input_proj is None:
            input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.input_proj = input_proj
        self.backbone = backbone
        self.input_channels = backbone.in_channels
        self.aux_loss = aux_loss
        if class_bias_prior > 0:
            nn.init.constant_(self.class_embed.bias, -math.log((1 - class_bias_prior) / class_bias_prior))

    def forward(self, samples) -> Dict:
        """samples, as DETR takes them: a NestedTensor (B, 3, H, W) + mask (B, H, W) True on padding, a (B, 3, H, W)
        tensor (no padding) or a list of (3, H, W) images of any sizes (padded bottom/right); else a ValueError.

        Returns 'pred_logits' (B, Q, C + 1), 'pred_boxes' (B, Q, 4) normalised cxcywh and, with aux_loss,
        'aux_outputs' for every decoder layer but the last. Needs no targets: image extents come from the mask.
        """
        return self.forward_with_features(samples)[0]

    def forward_with_features(self, samples) -> Tuple[Dict, Dict]:
        """``forward``'s outputs, and what DETR's segmentation head (models/segmentation.py) reads: 'features'
        (the backbone's NestedTensors, finest first), 'src' the projected last map (B, d, Hf, Wf), 'mask'
        (B, Hf, Wf), 'hs' the decoder outputs (L, B, Q, d) and 'memory' the encoder output (B, d, Hf, Wf)."""
        samples = as_nested_tensor(samples, self.input_channels)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()  # (B, C, Hf, Wf), (B, Hf, Wf)
        src = self.input_proj(src)  # (B, d, Hf, Wf)
        extent = image_extent(samples.mask, self.backbone.stride)  # (B, 2) feature cells
        hs, box_reference, memory = self.transformer(src, mask, self.query_embed.weight, pos[-1], extent)
        return self.predictions(hs, box_reference), {"features": features, "src": src, "mask": mask, "hs": hs,
                                                     "memory": memory}

    def predictions(self, hs: Tensor, box_reference: Tensor) -> Dict:
        """The heads on every decoder layer's output hs (L, B, Q, d): ``forward``'s dictionary."""
        outputs_class = self.class_embed(hs)  # (L, B, Q, C + 1)
        outputs_coord = (self.bbox_embed(hs) + box_reference).sigmoid()  # (L, B, Q, 4)
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out

    @torch.no_grad()
    def smca_diagnostics(self, samples: NestedTensor) -> Dict[str, Tensor]:
        """Per decoder layer: 'layer{l}/scale' (all predicted scales) and 'layer{l}/offset_norm' (mean |delta|
        of the head centres), from one forward pass. Empty for plain DETR."""
        priors: List[nn.Module] = list(getattr(self.transformer.decoder, "priors", []))
        stats: Dict[str, Tensor] = {}

        def recorder(index):
            def hook(module, args):
                tgt, query_pos = args[0], args[1]
                for name, value in module.diagnostics(tgt, query_pos).items():
                    if value.numel():  # type1 has no scales
                        stats[f"layer{index}/{name}"] = value.detach().cpu()
            return hook

        handles = [prior.register_forward_pre_hook(recorder(i)) for i, prior in enumerate(priors)]
        was_training = self.training
        self.eval()
        try:
            self(samples)
        finally:
            self.train(was_training)
            for handle in handles:
                handle.remove()
        return stats
