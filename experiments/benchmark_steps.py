"""What one benchmark measurement runs (experiments/benchmark_model.py): a synthetic batch, a training step and an
inference step of a freshly built model, and their time and peak memory.

  train:     forward + criterion + backward + gradient clipping (--clip_max_norm, 0.1 as DETR) + AdamW step
  inference: model.eval(), no_grad, forward + post-processing
"""
from typing import Callable, Optional

import torch

from experiments.benchmark_common import autocast, peak_memory
from models import build_model
from models.acceleration import accelerate
from models.criterion import weighted
from util.misc import nested_tensor_from_tensor_list

BOXES_PER_IMAGE = (3, 6)  # inclusive range of random boxes per synthetic image
BATCH_SEED = 0
MODEL_SEED = 0


def synthetic_batch(batch_size: int, height: int, width: int, num_classes: int, seed: int = BATCH_SEED):
    """(NestedTensor (B, 3, H, W) without padding, targets in the dataset format), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, height, width, generator=generator) for _ in range(batch_size)]
    size = torch.tensor([height, width])
    targets = []
    for index in range(batch_size):
        count = int(torch.randint(BOXES_PER_IMAGE[0], BOXES_PER_IMAGE[1] + 1, (1,), generator=generator))
        centers = 0.2 + 0.6 * torch.rand(count, 2, generator=generator)  # (N, 2) cx, cy inside the image
        extents = 0.05 + 0.3 * torch.rand(count, 2, generator=generator)  # (N, 2) w, h
        targets.append({
            "boxes": torch.cat([centers, extents], dim=1),  # (N, 4) normalised cxcywh
            "labels": torch.randint(0, num_classes, (count,), generator=generator),
            "image_id": torch.tensor([index]),
            "orig_size": size.clone(),
            "size": size.clone(),
            "area": extents.prod(dim=1) * height * width,
            "iscrowd": torch.zeros(count, dtype=torch.int64),
        })
    return nested_tensor_from_tensor_list(images), targets


# ---------------------------------------------------------------------------------------------------- steps

def float32_outputs(outputs: dict) -> dict:
    """Losses and post-processing in float32 whatever the autocast dtype (as engine.py)."""
    return {k: (v.float() if isinstance(v, torch.Tensor) else [{n: t.float() for n, t in aux.items()} for aux in v])
            for k, v in outputs.items()}


def build_fork(args):
    """This repo's model, criterion and post-processors, random weights (no download)."""
    return build_model(args, backbone_weights="none")


class Built:
    """One cell's model, criterion and post-processors, built once and shared by its training and inference
    steps, with main.py's speed flags applied (--channels_last, --compile). ``build(args)`` returns the three;
    this repo's build_model by default, the original SMCA code's in experiments/benchmark_seed.py (whose args
    carry channels_last False and compile None)."""

    def __init__(self, args, device: torch.device, build: Callable = build_fork):
        torch.manual_seed(MODEL_SEED)  # identical weights for the parameters every variant shares
        model, criterion, self.postprocessors = build(args)
        self.module = model.to(device)  # uncompiled: its parameters are the optimizer's
        self.model, self.criterion = accelerate(self.module, args.channels_last, args.compile), criterion.to(device)


def make_train_step(args, samples, targets, device: torch.device, built: Optional[Built] = None) -> Callable[[], None]:
    """One DETR training step: forward, criterion, backward, clip to --clip_max_norm, AdamW step. The gradients
    are freed after the step, so cells that wait for their next round keep only weights and optimizer state."""
    built = built or Built(args, device)
    model, criterion = built.model, built.criterion
    named = list(built.module.named_parameters())
    backbone = [p for n, p in named if "backbone" in n and p.requires_grad]
    rest = [p for n, p in named if "backbone" not in n and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": args.lr}, {"params": backbone, "lr": args.lr_backbone}],
                                  lr=args.lr, weight_decay=args.weight_decay)
    weights = criterion.weight_dict
    amp = args.amp

    def step() -> None:
        model.train()
        criterion.train()
        with autocast(device, amp):
            outputs = model(samples)
        loss_dict = criterion(float32_outputs(outputs), targets)
        loss = sum(weighted(loss_dict, weights).values())
        loss.backward()
        if args.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(built.module.parameters(), args.clip_max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_inference_step(args, samples, targets, device: torch.device,
                        built: Optional[Built] = None) -> Callable[[], None]:
    """Inference as in evaluation: eval mode, no_grad, forward and post-processing to absolute boxes."""
    built = built or Built(args, device)
    model, postprocessors = built.model, built.postprocessors
    orig_sizes = torch.stack([t["orig_size"] for t in targets])  # (B, 2)
    amp = args.amp

    @torch.no_grad()
    def step() -> None:
        model.eval()
        with autocast(device, amp):
            outputs = model(samples)
        postprocessors["bbox"](float32_outputs(outputs), orig_sizes)

    return step


STEPS = {"train": make_train_step, "infer": make_inference_step}


def memory_step(kind: str, args, batch, device: torch.device, meter) -> int:
    """Peak bytes of one ``kind`` step of a fresh model (see experiments/benchmark_common.py)."""
    samples, targets = batch
    return peak_memory(lambda: STEPS[kind](args, samples, targets, device), device, meter)
