"""Free space for a run's checkpoints, checked before the first epoch (a full disk is otherwise found at the
first save, after a whole epoch of compute)."""
import os
import shutil

from torch import nn

from util.errors import UserError


def checkpoint_bytes(model: nn.Module, optimizer_states: int) -> int:
    """A training checkpoint's size, estimated before the first save: the model's state (parameters and
    buffers) plus ``optimizer_states`` tensors per trainable parameter (2 for AdamW). The rest of a checkpoint
    (configuration, RNG states) is small."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + optimizer_states * trainable


def check_free_space(folder: str | os.PathLike, checkpoint_size: int) -> None:
    """UserError unless the file system of ``folder`` (or of its nearest existing parent) has at least twice
    ``checkpoint_size`` free: a save writes the new file next to the previous one before replacing it, so a
    full disk is found before the first epoch instead of at its end."""
    probe = os.path.abspath(os.path.expanduser(folder))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < 2 * checkpoint_size:
        raise UserError(f'--output_dir {folder}: its file system has {_mb(free)} free, less than twice a checkpoint '
                        f'(about {_mb(checkpoint_size)}: model and optimizer state); free space or choose another '
                        f'--output_dir')


def _mb(size: int) -> str:
    return f'{size / 2**20:.1f} MiB'
