"""main.py's flags, checked: the values and combinations a run refuses at parse time, and --dataset_file and
--device where they are left out (one clear message per refusal, docs/ablation-modules.md and docs/data.md).

The flags themselves, their defaults and their meaning for checkpoints are declared in options.py.
"""
import argparse

from options import COCO_PATH_FLAGS, COMPILE_REFUSED, ENC_PATTERN_LAYERS, MS_DEFAULTS, MS_LEVELS, main_parser
from util.errors import UserError


def parse_main(argv: list) -> argparse.Namespace:
    """main.py's flags, checked (a one-line error and exit 2 on a bad one); needs no torch unless --device is
    left to its default or names CUDA, so --help and flag errors answer at once."""
    parser = main_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except UserError as exc:
        parser.error(str(exc))
    return args


def check_args(args) -> None:
    """Parse-time validation of values and combinations; raises UserError with one clear message."""
    _check_dataset_flags(args)
    positive = ("batch_size", "epochs", "lr_drop", "enc_layers", "dec_layers", "hidden_dim", "nheads",
                "num_queries", "dim_feedforward", "log_every", "save_every", "eval_every")
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.hidden_dim % args.nheads:
        raise UserError(f"--hidden_dim {args.hidden_dim} must be divisible by --nheads {args.nheads}")
    if args.hidden_dim % 2:
        raise UserError(f"--hidden_dim {args.hidden_dim} must be even (half goes to x, half to y positions)")
    if args.num_detections is not None and args.num_detections <= 0:
        raise UserError(f"--num_detections must be positive, got {args.num_detections}")
    for flag in ("head_mixture", "query_mixture"):
        if getattr(args, flag) and args.dynamic_scale == "none":
            raise UserError(f"--{flag} mixes the spatial prior with plain attention and needs --dynamic_scale "
                            f"type1|type2|type3|type4 (got none)")
    if args.head_mixture and args.nheads < 2:
        raise UserError(f"--head_mixture needs at least 2 heads (the prior goes to floor(nheads/2)), "
                        f"got --nheads {args.nheads}")
    if args.query_mixture and args.num_queries < 2:
        raise UserError(f"--query_mixture needs at least 2 queries, got --num_queries {args.num_queries}")
    if args.num_classes is not None and args.num_classes <= 0:
        raise UserError(f"--num_classes must be positive, got {args.num_classes}")
    if args.frozen_weights and not args.masks:
        raise UserError("--frozen_weights trains DETR's mask head on a frozen detector and needs --masks")
    if args.mask_attention != "detr" and not args.masks:
        raise UserError(f"--mask_attention {args.mask_attention} changes the map DETR's mask head reads and needs "
                        f"--masks")
    if args.frozen_weights and args.finetune_from:
        raise UserError("--frozen_weights and --finetune_from both give the detector its weights; pass one")
    if args.masks:
        from models.segmentation import MASK_HEAD_NARROWING

        if args.hidden_dim < MASK_HEAD_NARROWING:
            raise UserError(f"--masks: the mask head narrows --hidden_dim by {MASK_HEAD_NARROWING}; "
                            f"--hidden_dim {args.hidden_dim} is smaller")
    if args.dilation and args.backbone in ("resnet18", "resnet34"):
        raise UserError(f"--dilation needs a bottleneck ResNet (resnet50 or resnet101); torchvision's "
                        f"{args.backbone} blocks do not support dilation")
    _check_multiscale(args)
    check_speed_flags(args)
    if min(args.skip_nonfinite, args.max_iters_per_epoch, args.start_epoch, args.num_workers) < 0:
        raise UserError("--skip_nonfinite, --max_iters_per_epoch, --start_epoch and --num_workers must be >= 0")
    if args.eval and not (args.resume or args.finetune_from or args.eval_untrained):
        raise UserError("--eval scores trained weights but no --resume PATH was given; pass --resume PATH|URL (or "
                        "--finetune_from PATH), or --eval_untrained to score the untrained model on purpose")
    if args.overwrite and args.eval:
        raise UserError("--overwrite starts a new training run in --output_dir; it has no meaning with --eval")
    if args.overwrite and args.output_dir and _continues_folder(args):
        raise UserError(f"--overwrite starts over but --resume {args.resume} continues the run in --output_dir; "
                        f"pass one of them")
    if args.save_detections and not (args.eval and args.output_dir):
        raise UserError("--save_detections writes <output_dir>/detections.json of an evaluation; "
                        "it needs --eval and --output_dir")
    if args.resume and args.finetune_from:
        raise UserError("--resume and --finetune_from exclude each other: resume continues a run, "
                        "finetune_from starts a new one from another run's weights")
    # last: these import torch (CUDA), the checks above answer without it
    from util.dist import default_device

    if args.device is None:
        args.device = default_device()
    if args.amp and not args.device.startswith("cuda"):
        raise UserError(f"--amp uses bf16 autocast on CUDA; --device is {args.device}")
    if args.device.startswith("cuda") and default_device() != "cuda":
        raise UserError(f"--device {args.device} but CUDA is not available; use --device cpu")


def check_speed_flags(args) -> None:
    """--compile: refuse, in one line, what it does not handle (docs/training-and-run-folders.md, "Speed flags")."""
    if args.compile:
        for flag, reason in COMPILE_REFUSED.items():
            if getattr(args, flag) not in (False, "none"):
                raise UserError(f"--compile with --{flag}: {reason}; drop --compile (this run then runs eagerly)")
        if args.compile == "inductor" and args.fixed_size is None and not args.eval:
            raise UserError("--compile inductor compiles the training step again for every feature-map size (its "
                            "convolution backward specialises on it); pass --fixed_size N|HxW (one padded canvas, "
                            "one compilation) or --compile aot_eager")


def _continues_folder(args) -> bool:
    from rundir import run_folder

    return run_folder.continues_folder(args)


def _check_multiscale(args) -> None:
    """Refuse multi-scale flags that mean nothing for the chosen model (docs/multiscale-smca.md, "Refusals")."""
    if args.ms_levels == "none":
        for name, default in MS_DEFAULTS.items():
            if getattr(args, name) != default:
                raise UserError(f"--{name} {getattr(args, name)} configures multi-scale SMCA; it needs --ms_levels "
                                f"{'|'.join(MS_LEVELS[1:])}")
        return
    refusals = (
        (args.dynamic_scale == "none", "the multi-scale decoder is built on the spatial prior; pass --dynamic_scale "
                                       "type1|type2|type3|type4"),
        (args.dilation, "--dilation makes a single stride-16 map; multi-scale reads the undilated strides"),
        (args.masks, "--masks is not supported with multi-scale (the mask head reads one memory map); drop one"),
        (args.position_embedding != "sine", "the levels use the sine position encoding (a learned one has 50 rows, "
                                            "fewer than the stride-8/16 maps); drop --position_embedding"),
        (args.ms_encoder == "dwconv" and args.enc_pattern != "",
         "--enc_pattern chooses attention layers; --ms_encoder dwconv has none (its depth is --enc_layers)"),
        (args.ms_encoder == "dwconv" and args.intra_share != 1,
         "--intra_share 0 unshares attention blocks; --ms_encoder dwconv has none"),
        (args.ms_encoder == "dwconv" and args.pre_norm, "--pre_norm is not defined for --ms_encoder dwconv"),
    )
    for refused, message in refusals:
        if refused:
            raise UserError(f"--ms_levels {args.ms_levels}: {message}")
    pattern = args.enc_pattern
    if pattern and (set(pattern) - set(ENC_PATTERN_LAYERS) or len(pattern) != args.enc_layers):
        raise UserError(f"--enc_pattern {pattern} must be {len(pattern)} letters of {ENC_PATTERN_LAYERS} and its length "
                        f"is the encoder depth: pass --enc_layers {len(pattern)} (got {args.enc_layers})")
    if args.intra_share != 1 and args.ms_encoder == "attn" and "I" not in (pattern or "I"):
        raise UserError(f"--intra_share 0 unshares the I layers, but --enc_pattern {pattern} has none")


def _check_dataset_flags(args) -> None:
    """Infer --dataset_file where it is left out; refuse dataset flags that the chosen dataset would ignore."""
    paths = [f"--{name}" for name in COCO_PATH_FLAGS if getattr(args, name)]
    if args.dataset_file is None:
        if args.voc_path and (args.coco_path or paths):
            raise UserError(f"--voc_path and {(['--coco_path'] if args.coco_path else paths)[0]} name two datasets; "
                            f"pass --dataset_file voc or coco")
        args.dataset_file = inferred_dataset_file(args)
    if args.coco_panoptic_path and args.dataset_file != "coco_panoptic":
        raise UserError(f"--coco_panoptic_path needs --dataset_file coco_panoptic (got {args.dataset_file})")
    if paths and args.dataset_file != "coco":
        raise UserError(f"{paths[0]} names part of a COCO-format set and needs --dataset_file coco "
                        f"(got {args.dataset_file})")
    for flag in ("voc_path", "voc_classes"):
        if getattr(args, flag) and args.dataset_file != "voc":
            raise UserError(f"--{flag} needs --dataset_file voc (got {args.dataset_file})")
    voc_layout = args.dataset_file == "voc" or (args.dataset_file == "synthetic" and args.synthetic_format == "voc")
    if args.voc_keep_difficult and not voc_layout:
        raise UserError("--voc_keep_difficult needs a VOC-layout set (--dataset_file voc, or synthetic with "
                        "--synthetic_format voc)")
    if args.masks and args.synthetic_format != "coco":
        raise UserError("--masks reads the synthetic panoptic set, written in COCO panoptic's layout only; "
                        "drop --synthetic_format")
    if args.synthetic_format != "coco" and args.dataset_file != "synthetic":
        raise UserError(f"--synthetic_format {args.synthetic_format} needs --dataset_file synthetic "
                        f"(got {args.dataset_file})")
    if args.synthetic_preset != "default" and (args.dataset_file != "synthetic" or args.masks):
        raise UserError(f"--synthetic_preset {args.synthetic_preset} chooses the objects of the synthetic box set; "
                        f"it needs --dataset_file synthetic without --masks")
    if args.masks and args.mosaic:
        raise UserError("--mosaic composes boxes only, not segment masks; drop it with --masks")
    if args.dataset_file == "synthetic" and args.masks:
        args.dataset_file = "synthetic_panoptic"  # the synthetic set with segments (datasets/synthetic_panoptic.py)


def inferred_dataset_file(args) -> str:
    """--dataset_file when left out: from the path flags given, else the embedded synthetic set."""
    if args.coco_panoptic_path:
        return "coco_panoptic"
    if args.voc_path:
        return "voc"
    return "coco" if args.coco_path or any(getattr(args, name) for name in COCO_PATH_FLAGS) else "synthetic"
