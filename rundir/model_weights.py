"""Putting a checkpoint's weights into a model, with short, actionable errors.

- ``load_model_weights``: the whole state dict (--resume, --frozen_weights, inference); a mismatch raises UserError
  with the counts, the first few keys and the flags that likely differ.
- ``finetune_weights``: every tensor whose name and shape fit (--finetune_from); the rest keeps its fresh init.
- ``detector_weights``: the box detector's part of a detector or segmentation checkpoint.

Reading and writing the checkpoint files is rundir/checkpoint.py.
"""
from collections.abc import Mapping

import torch
from torch import nn

from util.errors import UserError

_SHOWN_KEYS = 5


def load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                       strict: bool = True) -> list[str]:
    """``model.load_state_dict`` with a short, actionable error instead of PyTorch's key dump.

    Any shape mismatch, and with ``strict`` any missing or unexpected key, raises UserError with the
    counts, the first few keys of each kind and the flags that likely differ. A checkpoint saved from a
    DistributedDataParallel wrapper ('module.' prefix) is accepted. Returns the notes on missing /
    unexpected keys that ``strict=False`` tolerated (empty when everything matched).
    """
    state_dict = _strip_ddp_prefix(model, state_dict)
    missing, unexpected, mismatched = _compare(model, state_dict)
    if mismatched or (strict and (missing or unexpected)):
        parts = [f'{len(missing)} missing', f'{len(unexpected)} unexpected',
                 f'{len(mismatched)} with another shape']
        details = []
        if missing:
            details.append(f'missing: {_few(missing)}')
        if unexpected:
            details.append(f'unexpected: {_few(unexpected)}')
        if mismatched:
            details.append('shapes (checkpoint vs model): ' + _few(
                [f'{k} {tuple(state_dict[k].shape)} vs {tuple(shape)}' for k, shape in mismatched]))
        raise UserError(f'the checkpoint does not fit the model ({", ".join(parts)}); '
                        f'{"; ".join(details)}; likely fix: {_likely_fix(missing, unexpected, mismatched)}')
    model.load_state_dict(state_dict, strict=strict)
    return _key_notes(missing, unexpected)


def finetune_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Initialise ``model`` from every checkpoint tensor whose name and shape fit; keep the rest fresh.

    Meant for --finetune_from: e.g. a COCO class_embed (92 rows) does not fit a model with another
    --num_classes, so that head keeps the model's fresh initialisation. Returns messages listing the
    re-initialised (shape mismatch), missing and unused keys.
    """
    state_dict = _strip_ddp_prefix(model, state_dict)
    missing, unexpected, mismatched = _compare(model, state_dict)
    skipped = {k for k, _ in mismatched}
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in skipped}, strict=False)
    messages = [f'kept fresh initialisation for {k}: checkpoint {tuple(state_dict[k].shape)} vs model '
                f'{tuple(shape)}' for k, shape in mismatched]
    return messages + _key_notes(missing, unexpected)


def detector_weights(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The box detector's weights for --frozen_weights: a detector checkpoint's as they are, or the ``detr.`` part
    of a segmentation checkpoint (its mask head dropped), without a DDP 'module.' prefix."""
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    if any(k.startswith('detr.') for k in state_dict):
        return {k.removeprefix('detr.'): v for k, v in state_dict.items() if k.startswith('detr.')}
    return state_dict


def _strip_ddp_prefix(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
    own = model.state_dict()
    if state_dict and all(k.startswith('module.') for k in state_dict) and not any(
            k.startswith('module.') for k in own):
        return {k.removeprefix('module.'): v for k, v in state_dict.items()}
    return dict(state_dict)


def _compare(model: nn.Module, state_dict: Mapping[str, torch.Tensor]):
    """(missing keys, unexpected keys, [(key, model shape)] with another shape), in model order."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [(k, v.shape) for k, v in own.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    return missing, unexpected, mismatched


def _few(items: list[str]) -> str:
    shown = ', '.join(items[:_SHOWN_KEYS])
    return shown if len(items) <= _SHOWN_KEYS else f'{shown}, ... ({len(items) - _SHOWN_KEYS} more)'


def _key_notes(missing: list[str], unexpected: list[str]) -> list[str]:
    notes = []
    if missing:
        notes.append(f'{len(missing)} model keys not in the checkpoint, left at fresh initialisation: '
                     f'{_few(missing)}')
    if unexpected:
        notes.append(f'{len(unexpected)} checkpoint keys not used by the model: {_few(unexpected)}')
    return notes


# Key fragment -> the flag that most likely explains a mismatch on it.
_FIX_BY_KEY = (
    ('class_embed', '--num_classes (or --finetune_from to re-initialise the class head)'),
    ('query_embed', '--num_queries'),
    ('backbone.0.body.layer', '--backbone'),
    ('row_embed', '--position_embedding'),
    ('col_embed', '--position_embedding'),
    ('transformer.encoder.layers', '--enc_layers'),
    ('transformer.decoder.layers', '--dec_layers'),
    ('transformer.encoder.norm', '--pre_norm'),
    ('linear1', '--dim_feedforward'),
    ('mask_head', '--masks'),
    ('bbox_attention', '--masks'),
    ('input_proj', '--hidden_dim'),
)


# The SMCA modules of the decoder (models/transformer.py, SMCADecoder): DETR's own checkpoints lack them.
_SMCA_KEYS = ('transformer.decoder.reference.', 'transformer.decoder.priors.')


def _likely_fix(missing: list[str], unexpected: list[str], mismatched: list) -> str:
    if missing and not unexpected and not mismatched and all(
            any(part in f'.{k}' for part in (f'.{prefix}' for prefix in _SMCA_KEYS)) for k in missing):
        return ('the checkpoint has no SMCA modules (a DETR checkpoint, or one trained with --dynamic_scale none); '
                'to start the SMCA model from its weights, pass it as --finetune_from PATH (the SMCA modules keep '
                'their fresh initialisation) instead of --resume')
    keys = missing + unexpected + [k for k, _ in mismatched]
    fixes = []
    for fragment, fix in _FIX_BY_KEY:
        if fix not in fixes and any(fragment in k for k in keys):
            fixes.append(fix)
    if not fixes:
        fixes.append('the SMCA flags (--dynamic_scale, --head_mixture, --query_mixture) or --hidden_dim')
    return 'check ' + ', '.join(fixes) + ' against the run that wrote the checkpoint'


