"""From main.py's command line to one run's configuration, resolved in one pass (docs/architecture.md).

``parse_command_line`` reads the flags (``get_args_parser``, DETR's, is main.py's parser; main.py offers it).

``resolve_run`` settles everything a run reads about itself, in this order: the checkpoint it continues or
evaluates (--resume; ``auto``: <output_dir>/checkpoint.pth when present) and --frozen_weights' checkpoint, the
architecture flags they fix (a checkpoint's stored config, or what an official DETR checkpoint's weights tell),
the checks and the defaults that depend on other flags (loss coefficients, --num_classes from the data), the
configuration stored in checkpoints and config.json, and the text printed about it. Everything after it reads
the ``Resolved`` it returns; nothing after it reads options.py.
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from flag_checks import check_args, inferred_dataset_file, parse_main
from options import ARCH_FLAGS, MASK_HEAD_FLAGS, get_args_parser, loss_defaults, main_parser, resolve_loss
from rundir import checkpoint as ckpt
from rundir import run_config
from util.dist import default_device
from util.errors import UserError


@dataclass
class Resolved:
    """One run's settled configuration."""
    args: argparse.Namespace  # every flag resolved (the namespace given to resolve_run, completed in place)
    explicit: frozenset  # the flags the user wrote (an explicit --lr overrides a resumed optimizer's)
    config: dict  # the flags as stored in checkpoints, config.json and TensorBoard's HPARAMS
    resume_path: str  # the checkpoint this run continues or evaluates ('' when none)
    checkpoint: Optional[dict]  # its contents
    frozen: Optional[dict]  # --frozen_weights' checkpoint: its detector is loaded and frozen
    summary: str  # the flags that differ from the defaults and the ablation line, for the console


def parse_command_line(argv: list) -> tuple[argparse.Namespace, set]:
    """main.py's flags, checked (a one-line error and exit 2 on a bad one), and the names of those written in
    ``argv`` (rundir.run_config.explicit_flags)."""
    return parse_main(argv), run_config.explicit_flags(main_parser(), argv)


def resolve_run(args: argparse.Namespace, explicit=frozenset()) -> Resolved:
    """The run's configuration from its flags ``args`` and the names the user wrote (``explicit``): see the module
    docstring. Prints each flag it takes from a checkpoint; UserError on a flag that conflicts with a checkpoint
    or with another flag."""
    resume_path = _resume_path(args)
    checkpoint = ckpt.load_checkpoint(resume_path, trust=args.trust_checkpoint) if resume_path else None
    if args.eval and checkpoint is None and not args.finetune_from and not args.eval_untrained:
        raise UserError(f"--eval --resume auto: no checkpoint.pth in {args.output_dir} to evaluate; pass "
                        f"--resume PATH, or --eval_untrained to score the untrained model on purpose")
    if checkpoint is not None:
        _adopt_architecture(args, explicit, checkpoint, resume_path)
    # DETR's second stage: the detector of a box checkpoint, frozen; the mask head (its flags) is what this run adds
    frozen = ckpt.load_checkpoint(args.frozen_weights, trust=args.trust_checkpoint) if args.frozen_weights else None
    if frozen is not None:
        _adopt_architecture(args, explicit, frozen, args.frozen_weights, ignore=set(MASK_HEAD_FLAGS))
    # after the checkpoints: stored configs hold resolved values, and the defaults follow the adopted flags
    resolve_args(args)
    return Resolved(args, frozenset(explicit), run_config.config_to_dict(args), resume_path, checkpoint, frozen,
                    f"{format_config(args)}\n{ablation_summary(args)}")


def _resume_path(args) -> str:
    if args.resume != "auto":
        return args.resume
    if not args.output_dir:
        raise UserError("--resume auto needs --output_dir (it resumes from <output_dir>/checkpoint.pth)")
    path = Path(args.output_dir) / "checkpoint.pth"
    return str(path) if path.exists() else ""


def _adopt_architecture(args, explicit, checkpoint: dict, path: str, ignore=()) -> None:
    """The architecture flags from a checkpoint's config, or inferred from an official DETR checkpoint's weights;
    prints what it takes."""
    stored = checkpoint.get("config")
    if stored:
        messages = (run_config.reconcile_config(args, explicit, stored, ARCH_FLAGS, path, ignore)
                    + run_config.dc5_batch_warning(args))
    else:
        messages = run_config.infer_official_config(checkpoint["model"], path, args, explicit, ignore)
    for message in messages:
        print(message)


def resolve_args(args) -> None:
    """Validate and fill derived defaults in place (cls_loss, coefficients, num_classes)."""
    check_args(args)
    resolve_loss(args)
    if args.num_classes is None:
        import datasets

        args.num_classes = datasets.num_classes_for(args)


def _automatic_values(args) -> dict:
    """What the 'auto' / None defaults resolve to for these flags (resolve_loss, check_args)."""
    from models import resolve_cls_loss

    cls_loss = resolve_cls_loss("auto", args.dynamic_scale)
    coefficients = loss_defaults(args.cls_loss if args.cls_loss in ("ce", "focal") else cls_loss)
    return {"cls_loss": cls_loss, **coefficients, "dataset_file": inferred_dataset_file(args),
            "device": default_device()}


def format_config(args) -> str:
    """The flags whose value differs from main.py's default, as an aligned block in definition order, for the
    console. A flag left at 'auto' (cls_loss and the loss defaults it picks, dataset_file) is not listed;
    num_classes, derived from the data, is. Every flag is in config.json and the HPARAMS dashboard."""
    defaults = {action.dest: action.default for action in get_args_parser()._actions}
    automatic = _automatic_values(args)
    changed = [(name, getattr(args, name)) for name, default in defaults.items()
               if hasattr(args, name) and getattr(args, name) not in (default, automatic.get(name, default))]
    if not changed:
        return "flags: all at their defaults"
    width = max(len(name) for name, _ in changed)
    lines = [f"  {name:<{width}}  {value}" for name, value in changed]
    return "\n".join(["flags that differ from the defaults (every flag: config.json, TensorBoard HPARAMS):", *lines])


def ablation_summary(args) -> str:
    prior = "off (plain DETR co-attention)" if args.dynamic_scale == "none" else (
        f"{args.dynamic_scale}, smooth {args.smooth:g}, head_mixture {args.head_mixture}, "
        f"query_mixture {args.query_mixture}, {args.prior_impl} route")
    masks = ""
    if args.masks:
        masks = ("; masks: mask head only, detector frozen from " + args.frozen_weights if args.frozen_weights
                 else "; masks: detector and mask head")
    scales = ""
    if args.ms_levels != "none":
        encoder = f"pattern {args.enc_pattern or 'I' * args.enc_layers}" if args.ms_encoder == "attn" else "dwconv"
        scales = (f"; multi-scale {args.ms_levels}: encoder {encoder}, intra_share {args.intra_share}, level_embed "
                  f"{args.level_embed}, scale_select {args.scale_select}, ms_prior {args.ms_prior}")
    return (f"ablation: dynamic_scale {prior}; cls_loss {args.cls_loss} (coef {args.cls_loss_coef:g}, "
            f"match cost {args.set_cost_class:g}); num_queries {args.num_queries}{masks}{scales}")
