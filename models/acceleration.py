"""Speed options that change no weight and no number beyond float32 rounding (main.py's --channels_last and
--compile; docs/training-and-run-folders.md, "Speed flags").

channels_last: the ResNet trunk's 4-D weights and its input image batch in channels-last (NHWC) memory format.
  Only the trunk: it is where the convolutions are; the transformer flattens the feature map either way.
  The weights keep their names and values (a state_dict is the same, a checkpoint loads into either layout).
compile: ``torch.compile`` of the model with dynamic shapes (``dynamic=True``):
  DETR pads each batch to its own largest image, so the image size changes from batch to batch; with static
  shapes every new size would be a new compilation. Dynamic shapes compile once per graph for every size.
  ``compile_counts()`` reads torch._dynamo's counters: how many frames were compiled (recompilations included)
  and how many graph breaks were met, for the run's last line.
"""
from typing import Dict, Optional

import torch
from torch import nn

from models.backbone import ResNetBody


def _input_to_channels_last(module: nn.Module, inputs: tuple) -> tuple:
    """Forward pre-hook of the trunk: its (B, 3, H, W) image batch in channels-last memory format."""
    return (inputs[0].contiguous(memory_format=torch.channels_last),) + tuple(inputs[1:])


def to_channels_last(model: nn.Module) -> int:
    """Every ResNet trunk of ``model`` (DETR has one; the segmentation model wraps it) and its input in
    channels-last memory format, in place. Returns the number of trunks converted (0: no ResNet trunk)."""
    bodies = [m for m in model.modules() if isinstance(m, ResNetBody)]
    for body in bodies:
        body.to(memory_format=torch.channels_last)
        body.register_forward_pre_hook(_input_to_channels_last)
    return len(bodies)


def compile_module(module: nn.Module, backend: str) -> nn.Module:
    """``torch.compile`` with dynamic shapes (see the module docstring). The returned module shares the
    parameters of ``module``; save and load the weights through ``module`` (the compiled one prefixes
    '_orig_mod.' to every name)."""
    # past torch's recompile limit a frame would silently run eagerly from then on; a run stops instead
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(module, backend=backend, dynamic=True)


def accelerate(model: nn.Module, channels_last: bool = False, compile_backend: Optional[str] = None) -> nn.Module:
    """``model`` with the speed options applied: the trunk in channels-last format (in place), then compiled when
    ``compile_backend`` names a torch.compile backend. The uncompiled ``model`` stays the one to save and load.
    The criterion is not compiled: see docs/training-and-run-folders.md, "Speed flags"."""
    if channels_last:
        to_channels_last(model)
    return compile_module(model, compile_backend) if compile_backend else model


def compile_counts() -> Dict[str, int]:
    """What torch.compile did in this process so far: frames compiled (each compilation and recompilation of a
    Python frame, forward and the backward it traced with it), graphs made, and graph breaks met."""
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["ok"], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


def compile_report() -> str:
    counts = compile_counts()
    return (f"torch.compile: {counts['frames']} frame compilations, {counts['graphs']} graphs, "
            f"{counts['graph_breaks']} graph breaks")
