"""Making a run's flags agree with a checkpoint, and the configuration dict a run stores.

- ``config_to_dict``: the resolved flags as JSON-able data ('config' in checkpoints, config.json).
- ``explicit_flags``: which flags the user wrote on the command line.
- ``reconcile_config`` / ``infer_official_config``: the architecture flags (the caller passes
  options.ARCH_FLAGS: this package sits below options.py) are taken from the checkpoint when not passed and are an error when passed and different, so a resume or an
  evaluation never silently builds a different model.
"""
import argparse
import os
from collections.abc import Iterable, Mapping

import torch

from util.errors import UserError

# ResNet depth from the weights: (blocks in layer3, bottleneck blocks have a conv3) -> torchvision name.
_RESNET_BY_LAYER3 = {
    (2, False): 'resnet18', (6, False): 'resnet34', (6, True): 'resnet50',
    (23, True): 'resnet101', (36, True): 'resnet152',
}


def config_to_dict(args: argparse.Namespace) -> dict:
    """The flags of ``args`` as a JSON-able dict, stored as 'config' in checkpoints and in config.json.

    Tuples become lists and paths strings; values JSON cannot hold (objects, devices) are left out,
    which also keeps the dict loadable with ``weights_only=True``.
    """
    config = {}
    for name, value in vars(args).items():
        value = _jsonable(value)
        if value is not _NOT_JSON:
            config[name] = value
    return config


_NOT_JSON = object()


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        return _NOT_JSON if any(v is _NOT_JSON for v in items) else items
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        items = {k: _jsonable(v) for k, v in value.items()}
        return _NOT_JSON if any(v is _NOT_JSON for v in items.values()) else items
    return _NOT_JSON


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dest names of the options actually written on the command line ``argv``.

    Handles ``--flag value``, ``--flag=value`` and flags without a value. ``argv`` is assumed to have
    parsed already, so a separate token equal to an option string is that option (argparse refuses a
    flag-like value unless it is glued on with '='). The parser is expected to have
    ``allow_abbrev=False``, so exact option strings are all argparse accepts; with abbreviations
    allowed, a unique prefix is matched the way argparse would.
    """
    dest_by_option = {option: action.dest for action in parser._actions for option in action.option_strings}
    explicit = set()
    for token in argv:
        if token == '--':
            break
        option = token.partition('=')[0]
        if option not in dest_by_option and parser.allow_abbrev and option.startswith('--'):
            matches = [o for o in dest_by_option if o.startswith(option)]
            option = matches[0] if len(matches) == 1 else option
        if option in dest_by_option:
            explicit.add(dest_by_option[option])
    return explicit


def reconcile_config(args: argparse.Namespace, explicit: set[str], stored: dict, arch_flags: Iterable[str],
                     ckpt_path: str | None = None, ignore: Iterable[str] = ()) -> list[str]:
    """Make the architecture flags of ``args`` match the checkpoint's stored 'config'.

    For each flag of ``arch_flags`` (options.ARCH_FLAGS) in ``stored`` (minus ``ignore``) whose value differs from ``args``: a
    flag the user did not pass (not in ``explicit``) takes the checkpoint's value; a flag the user passed
    raises UserError. Returns one message per adopted flag, for the caller to print. ``ckpt_path``
    names the checkpoint in errors (default: ``args.resume``). Call it before deriving defaults from
    these flags (resolve_args), since stored configs hold resolved values.
    """
    source = ckpt_path if ckpt_path is not None else getattr(args, 'resume', '') or 'checkpoint'
    messages = []
    for flag in arch_flags:
        if flag in stored and flag not in ignore:
            message = _adopt(args, explicit, flag, stored[flag], source)
            if message:
                messages.append(message)
    return messages


def infer_official_config(state_dict: Mapping[str, torch.Tensor], filename: str,
                          args: argparse.Namespace, explicit: set[str],
                          ignore: Iterable[str] = ()) -> list[str]:
    """Make ``args`` match an official DETR checkpoint, which stores no 'config', from its weights.

    Infers --backbone (ResNet depth from the number of layer3 blocks and whether they are bottlenecks),
    --num_queries and --hidden_dim (query_embed), --enc_layers/--dec_layers (layer keys),
    --dim_feedforward (linear1), --num_classes (class_embed rows - 1, the extra row is "no object"),
    --pre_norm (DETR only has an encoder norm with pre-norm), --position_embedding (learned has
    row/col embeddings) and --masks (segmentation heads). --nheads cannot be read from the weights and
    is kept. Flags the user did not pass take the inferred value; passed and different -> UserError.
    Pass e.g. ``ignore={'num_classes'}`` when fine-tuning to another label set.

    A file name containing 'dc5' requires --dilation: DC5 weights evaluated without it run but lose
    ~20 AP. Returns the messages to print, including the DC5 batch-size warning where it applies.
    """
    keys = {k.removeprefix('detr.'): v for k, v in state_dict.items()}
    source = f'{filename}, inferred from its weights'
    inferred = {}

    layer3 = _indices(keys, 'backbone.0.body.layer3.')
    if layer3:
        bottleneck = 'backbone.0.body.layer3.0.conv3.weight' in keys
        backbone = _RESNET_BY_LAYER3.get((len(layer3), bottleneck))
        if backbone is None:
            if 'backbone' not in explicit:
                raise UserError(f'cannot tell the ResNet depth of {filename} (layer3 has {len(layer3)} '
                                f'blocks); pass --backbone')
        else:
            inferred['backbone'] = backbone
        inferred['position_embedding'] = 'learned' if 'backbone.1.row_embed.weight' in keys else 'sine'
    if 'query_embed.weight' in keys:
        inferred['num_queries'], inferred['hidden_dim'] = keys['query_embed.weight'].shape
    if 'class_embed.weight' in keys:
        inferred['num_classes'] = keys['class_embed.weight'].shape[0] - 1
    if _indices(keys, 'transformer.decoder.layers.'):
        inferred['enc_layers'] = len(_indices(keys, 'transformer.encoder.layers.'))
        inferred['dec_layers'] = len(_indices(keys, 'transformer.decoder.layers.'))
        inferred['pre_norm'] = 'transformer.encoder.norm.weight' in keys
        if 'transformer.decoder.layers.0.linear1.weight' in keys:
            inferred['dim_feedforward'] = keys['transformer.decoder.layers.0.linear1.weight'].shape[0]
    inferred['masks'] = any(k.startswith('mask_head.') for k in keys)

    messages = []
    for flag, value in inferred.items():
        if flag not in ignore:
            message = _adopt(args, explicit, flag, value, source)
            if message:
                messages.append(f'{message} (inferred from its weights)')

    if 'dc5' in os.path.basename(filename).lower() and not getattr(args, 'dilation', False):
        raise UserError(f'{filename} looks like a DC5 checkpoint; add --dilation (evaluating DC5 weights '
                        f'without it silently loses ~20 AP)')
    return messages + dc5_batch_warning(args)


def dc5_batch_warning(args: argparse.Namespace) -> list[str]:
    """DETR's warning for evaluating a dilated (DC5) model with padded batches, as a 0/1-item list."""
    if getattr(args, 'dilation', False) and getattr(args, 'eval', False) and args.batch_size > 1:
        return ['warning: DC5 models lose several AP with more than one image per GPU (padding); '
                'use --batch_size 1 for evaluation']
    return []


def _adopt(args: argparse.Namespace, explicit: set[str], flag: str, value, source: str) -> str | None:
    """Set ``args.<flag> = value`` unless the user passed a different value (UserError)."""
    current = getattr(args, flag, None)
    if current == value:
        return None
    if flag in explicit:
        fix = 'drop the flag' if value is False else f'drop the flag or pass {_flag_text(flag, value)}'
        raise UserError(f'{_flag_text(flag, current)} conflicts with the checkpoint\'s {value!r} '
                        f'({source}); {fix}')
    setattr(args, flag, value)
    return f'taking {_flag_text(flag, value)} from the checkpoint'


def _flag_text(flag: str, value) -> str:
    if value is True:
        return f'--{flag}'
    if value is False:
        return f'no --{flag}'
    return f'--{flag} {value}'


def _indices(keys: Iterable[str], prefix: str) -> set[int]:
    """The distinct integer path components right after ``prefix`` ('a.layers.3.w' -> {3})."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split('.', 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found
