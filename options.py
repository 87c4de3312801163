"""main.py's flags: definitions (DETR's names and defaults, plus the ablation flags) and the loss defaults that
follow from --cls_loss. Their checks are in flag_checks.py; a run's configuration is resolved in run_setup.py.

What a flag means for checkpoints is declared here, where the flag is defined: ``architecture(...)`` marks a
flag whose value changes which weights exist or what they mean. ``ARCH_FLAGS`` is derived from those marks;
a resumed or evaluated model takes these flags from its checkpoint (rundir/run_config.py). --no_aux_loss is
not one: the auxiliary heads share the final head's weights, so it changes the loss, never the weights.
``mask_head(...)`` marks an architecture flag of DETR's mask head (``MASK_HEAD_FLAGS``): a box checkpoint
loaded with --frozen_weights has no mask head, so it does not fix these flags (run_setup.py).
``bookkeeping(...)`` marks a flag that names the run's own files or restart state, or changes no number of the
run (the COCO backends score alike, logging intervals): runs differ in it without being different ablations,
so experiments/compare.py neither shows it as a column nor lets it keep two seeds apart (``BOOKKEEPING_FLAGS``).
"""
import argparse
import math
import os

from rundir import lease

# torch, the models and the datasets are imported only after parsing (in the functions that need them), so
# --help and a flag error answer at once (tests/test_fast_cli.py). The names the parser offers are therefore
# spelled here; tests/test_fast_cli.py checks them against datasets.DATASETS and datasets.coco_eval.COCO_BACKENDS.
DATASET_NAMES = ("coco", "coco_panoptic", "voc", "synthetic", "synthetic_panoptic")
COCO_BACKEND_NAMES = ("faster_coco_eval", "pycocotools")
DYNAMIC_SCALES = ("none", "type1", "type2", "type3", "type4")
PRIOR_IMPLS = ("fused", "explicit")  # models/spatial_prior.py
MASK_ATTENTIONS = ("detr", "scaled")  # models/segmentation.py's ATTENTION_MAPS
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # torch.compile backends (models/acceleration.py)
# model flags --compile refuses (flag -> why), each found failing (docs/training-and-run-folders.md, "Speed flags")
COMPILE_REFUSED = {"ms_levels": "the multi-scale model compiles again when the image size changes, so it would "
                                 "recompile batch after batch"}
# multi-scale SMCA (docs/multiscale-smca.md): feature strides per --ms_levels value, plain tuples so --help stays light
MS_LEVELS = ("none", "16,32,64", "8,16,32,64")
MS_ENCODERS = ("attn", "dwconv")
SCALE_SELECTS = ("softmax", "none")
MS_PRIORS = ("shared", "per_level")
SYNTHETIC_PRESETS = ("default", "multiscale")  # datasets/synthetic.py PRESETS
ENC_PATTERN_LAYERS = "IM"  # --enc_pattern letters: I intra-scale, M multi-scale
# the multi-scale flags and their defaults; any other value needs --ms_levels
MS_DEFAULTS = {"ms_encoder": "attn", "enc_pattern": "", "intra_share": 1, "level_embed": 1, "scale_select": "softmax",
               "ms_prior": "shared"}
COCO_PATH_FLAGS = ("train_images", "train_ann", "val_images", "val_ann")


def loss_defaults(cls_loss: str) -> dict:
    """Defaults that depend on the classification loss ('ce' or 'focal'); focal's are the research code's."""
    from models.postprocess_segm import PANOPTIC_THRESHOLDS

    coefficient = {"ce": 1.0, "focal": 2.0}[cls_loss]
    return {"cls_loss_coef": coefficient, "set_cost_class": coefficient,
            "panoptic_threshold": PANOPTIC_THRESHOLDS[cls_loss]}


# Names from the SMCA research code and the paper that are not this project's flags: an unknown-flag error names
# the flag to use instead. Never accepted in their place: a run's flags stay one spelling (config.json, sweeps).
ALIASES = {
    "--focal_loss": "--cls_loss focal",
    "--sigmoid_focal_loss": "--cls_loss focal",
    "--beta": "--smooth",  # the paper's bandwidth of the Gaussian-like prior
    "--num_query": "--num_queries",
}


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit code 2, like every other input error (no usage dump); an unknown
    flag names the real flag of an ALIASES name, else the closest flag names."""

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self.suggestions(unknown)}")
        return parsed

    def suggestions(self, unknown: list) -> str:
        import difflib

        flags = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        hints = []
        for word in (w.split("=", 1)[0] for w in unknown if w.startswith("--")):
            if word in ALIASES:
                hints.append(f"the SMCA code's {word} is {ALIASES[word]} here")
            else:
                close = difflib.get_close_matches(word, flags, n=3, cutoff=0.7)
                if close:
                    hints.append(f"{word}: did you mean {' or '.join(close)}?")
        return "".join(f"; {hint}" for hint in hints)

    def error(self, message):
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


def main_parser() -> OneLineParser:
    """main.py's command line."""
    return OneLineParser("python main.py", parents=[get_args_parser()], allow_abbrev=False)


def architecture(action: argparse.Action) -> argparse.Action:
    """Mark a flag as architecture: a checkpoint fixes its value (see the module docstring)."""
    action.architecture = True
    return action


def mask_head(action: argparse.Action) -> argparse.Action:
    """Mark an architecture flag as the mask head's: --frozen_weights' box checkpoint does not fix it."""
    action.mask_head = True
    return architecture(action)


def bookkeeping(action: argparse.Action) -> argparse.Action:
    """Mark a flag as bookkeeping: not part of what a run measures (see the module docstring)."""
    action.bookkeeping = True
    return action


def architecture_flags(parser: argparse.ArgumentParser) -> tuple:
    """The dest names of the flags marked with ``architecture``, in definition order."""
    return marked_flags(parser, "architecture")


def marked_flags(parser: argparse.ArgumentParser, mark: str) -> tuple:
    """The dest names of the flags marked ``mark`` ('architecture', 'mask_head', 'bookkeeping'), in definition
    order."""
    return tuple(a.dest for a in parser._actions if getattr(a, mark, False))


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False):
    """An argparse ``type`` for a finite float in [low, high] (an open end with ``low_open``/``high_open``):
    nan, inf and out-of-range values fail at parse time with the flag's name and its range."""
    if low is not None and high is not None:
        wanted = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        wanted = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        wanted = "a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


NONNEGATIVE = number(0.0)


def fixed_size(text: str) -> tuple:
    """--fixed_size value: N (a square canvas) or HxW -> (H, W)."""
    height, sep, width = text.strip().lower().partition("x")
    try:
        size = (int(height), int(width if sep else height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 1024 or 800x1333), got {text!r}") from None
    if min(size) <= 0:
        raise argparse.ArgumentTypeError(f"the canvas must be at least 1x1, got {text!r}")
    return size


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DETR / SMCA ablations", add_help=False, allow_abbrev=False)

    def arch(*names, **kwargs):  # an architecture flag (see the module docstring)
        return architecture(parser.add_argument(*names, **kwargs))

    def head(*names, **kwargs):  # an architecture flag of the mask head (see the module docstring)
        return mask_head(parser.add_argument(*names, **kwargs))

    def books(*names, **kwargs):  # a bookkeeping flag (see the module docstring)
        return bookkeeping(parser.add_argument(*names, **kwargs))

    parser.add_argument("--lr", default=1e-4, type=NONNEGATIVE)
    parser.add_argument("--lr_backbone", default=1e-5, type=NONNEGATIVE,
                        help="0 freezes the backbone")
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--weight_decay", default=1e-4, type=NONNEGATIVE)
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--lr_drop", default=200, type=int)
    parser.add_argument("--clip_max_norm", default=0.1, type=NONNEGATIVE, help="gradient clipping max norm (0: off)")
    parser.add_argument("--frozen_weights", type=str, default=None,
                        help="with --masks: a box checkpoint (path or URL) whose detector is loaded and frozen, so "
                             "only the mask head trains (DETR's second stage)")

    # model
    arch("--backbone", default="resnet50", type=str,
         help="resnet18 | resnet34 | resnet50 | resnet101")
    parser.add_argument("--backbone_weights", default="imagenet", type=str,
                        help="imagenet (torchvision download) | none | PATH to a ResNet state dict")
    arch("--backbone_norm", default="frozen", choices=("frozen", "batch"),
         help="frozen: DETR's frozen BatchNorm, layer2-4 trained (for pretrained weights); "
              "batch: trainable BatchNorm, every layer trained (for training from scratch)")
    arch("--dilation", action="store_true", help="DC5: dilate the last stage (stride 16)")
    arch("--position_embedding", default="sine", choices=("sine", "learned"))
    arch("--enc_layers", default=6, type=int)
    arch("--dec_layers", default=6, type=int)
    arch("--dim_feedforward", default=2048, type=int)
    arch("--hidden_dim", default=256, type=int)
    parser.add_argument("--dropout", default=0.1, type=number(0.0, 1.0, high_open=True))
    arch("--nheads", default=8, type=int)
    arch("--num_queries", default=100, type=int)
    arch("--pre_norm", action="store_true")
    head("--masks", action="store_true",
         help="DETR's segmentation head (panoptic sets: coco_panoptic, synthetic); the backbone returns layer1-4")
    head("--mask_attention", default="detr", choices=MASK_ATTENTIONS,
         help="--masks: the per-query attention map the mask head reads. detr: DETR's probabilities (one softmax "
              "over heads x cells, about 1 / (heads x cells) each); scaled: the same map times heads x the "
              "image's cells (1 where uniform), level with the features beside it, so the head learns in hundreds "
              "of steps instead of DETR's many thousands (docs/panoptic.md). Same weights either way")

    # SMCA ablations (docs/ablation-modules.md)
    arch("--dynamic_scale", default="none", choices=DYNAMIC_SCALES,
         help="spatially modulated co-attention and its scale variant; none = plain DETR")
    arch("--smooth", default=8.0, type=number(0.0, low_open=True), help="bandwidth beta of the log-prior -D / beta")
    arch("--head_mixture", action="store_true", help="prior on the first half of the heads only")
    arch("--query_mixture", action="store_true",
         help="the first half of the queries are plain DETR queries")
    # not an architecture flag: both routes compute the same logits with the same weights
    parser.add_argument("--prior_impl", default="fused", choices=PRIOR_IMPLS,
                        help="fused: the prior as extra q/k dims of the co-attention (no (Q, H*W) tensor); "
                             "explicit: the prior G as an additive mask (reference)")

    # multi-scale SMCA (docs/multiscale-smca.md)
    arch("--ms_levels", default="none", choices=MS_LEVELS,
         help="feature strides of the multi-scale model (16,32,64: the paper's P; 8,16,32,64: the official zip's Z); "
              "none = the single-scale model")
    arch("--ms_encoder", default=MS_DEFAULTS["ms_encoder"], choices=MS_ENCODERS,
         help="attn: intra-/multi-scale self-attention layers (--enc_pattern); dwconv: Z's depthwise-conv layers")
    arch("--enc_pattern", default=MS_DEFAULTS["enc_pattern"], type=str, metavar="[IM]+",
         help="attn encoder: one letter per layer, I intra-scale, M multi-scale; its length must equal "
              "--enc_layers (the paper: --enc_layers 5 --enc_pattern IIMII); default: all I")
    arch("--intra_share", default=MS_DEFAULTS["intra_share"], type=int, choices=(0, 1),
         help="1: an I layer applies one block to every level; 0: one block per level")
    arch("--level_embed", default=MS_DEFAULTS["level_embed"], type=int, choices=(0, 1),
         help="1: a learned embedding per level is added to its positions")
    arch("--scale_select", default=MS_DEFAULTS["scale_select"], choices=SCALE_SELECTS,
         help="softmax: one co-attention softmax per level, mixed by per-query weights softmax(Linear(u)); "
              "none: one joint softmax over every level's keys")
    arch("--ms_prior", default=MS_DEFAULTS["ms_prior"], choices=MS_PRIORS,
         help="shared: one Gaussian per head in image space for every level (P); per_level: offsets and scales "
              "per level, each in its own cells (Z)")

    # loss
    parser.add_argument("--no_aux_loss", action="store_true", help="loss on the last decoder layer only")
    arch("--cls_loss", default="auto", choices=("auto", "ce", "focal"),
         help="auto: focal with --dynamic_scale, ce without")
    parser.add_argument("--focal_alpha", default=0.25, type=number(0.0, 1.0))
    parser.add_argument("--focal_gamma", default=2.0, type=NONNEGATIVE)
    parser.add_argument("--set_cost_class", default=None, type=NONNEGATIVE, help="default: 1 (ce) / 2 (focal)")
    parser.add_argument("--set_cost_bbox", default=5.0, type=NONNEGATIVE)
    parser.add_argument("--set_cost_giou", default=2.0, type=NONNEGATIVE)
    parser.add_argument("--cls_loss_coef", default=None, type=NONNEGATIVE, help="default: 1 (ce) / 2 (focal)")
    parser.add_argument("--bbox_loss_coef", default=5.0, type=NONNEGATIVE)
    parser.add_argument("--giou_loss_coef", default=2.0, type=NONNEGATIVE)
    parser.add_argument("--eos_coef", default=0.1, type=NONNEGATIVE, help="no-object class weight (ce)")
    parser.add_argument("--mask_loss_coef", default=1.0, type=NONNEGATIVE,
                        help="--masks: weight of the mask focal loss")
    parser.add_argument("--dice_loss_coef", default=1.0, type=NONNEGATIVE,
                        help="--masks: weight of the mask DICE loss")

    # evaluation
    parser.add_argument("--num_detections", default=None, type=int,
                        help="detections kept per image for evaluation; default: num_queries (query, class) "
                             "pairs for focal (the original SMCA post-processing), one per query for ce (DETR)")
    parser.add_argument("--panoptic_threshold", default=None, type=number(0.0, 1.0, high_open=True),
                        help="--masks: a query joins the panoptic segmentation when its class score exceeds this; "
                             "default 0.85 on the softmax (ce, DETR), 0.5 on the best sigmoid (focal)")

    # data (docs/data.md)
    parser.add_argument("--dataset_file", default=None, choices=DATASET_NAMES,
                        help="default: coco_panoptic when --coco_panoptic_path is given, coco when --coco_path or a "
                             "--train_*/--val_* path is (DETR's commands), voc when --voc_path is, else the embedded "
                             "synthetic set (its panoptic version with --masks)")
    parser.add_argument("--coco_path", type=str, default=None,
                        help="COCO layout: train2017/ val2017/ annotations/instances_{train,val}2017.json")
    parser.add_argument("--coco_panoptic_path", type=str, default=None,
                        help="coco_panoptic: folder with annotations/panoptic_{train,val}2017.json and the PNG folders "
                             "panoptic_{train,val}2017/")
    for split in ("train", "val"):
        parser.add_argument(f"--{split}_images", type=str, default=None,
                            help=f"{split} image folder of a COCO-format set (default: <coco_path>/{split}2017)")
        parser.add_argument(f"--{split}_ann", type=str, default=None,
                            help=f"{split} COCO annotation file (default: "
                                 f"<coco_path>/annotations/instances_{split}2017.json)")
    arch("--num_classes", type=int, default=None,
         help="largest category id + 1 (default: read from the annotation file and printed; 91 for COCO 2017)")
    parser.add_argument("--voc_path", type=str, default=None, help="a VOCdevkit folder (holding VOC2007/, VOC2012/)")
    parser.add_argument("--voc_train", type=str, default="2007-trainval,2012-trainval",
                        help="YEAR-SET,...: VOC<YEAR>/ImageSets/Main/<SET>.txt lists of training images")
    parser.add_argument("--voc_val", type=str, default="2007-test", help="YEAR-SET,... of the evaluated images")
    parser.add_argument("--voc_classes", type=str, default=None,
                        help="class names, comma-separated or a file with one per line (category ids 1..K in "
                             "that order); default: the 20 Pascal VOC classes")
    parser.add_argument("--voc_keep_difficult", action="store_true",
                        help="train on objects marked difficult too (evaluation always ignores them, as VOC)")
    parser.add_argument("--mosaic", type=number(0.0, 1.0), default=0.0,
                        help="probability that a training sample is a 2x2 mosaic of four images (0: off)")
    parser.add_argument("--fixed_size", type=fixed_size, default=None, metavar="N|HxW",
                        help="resize (aspect kept) and pad every train and eval image to one HxW canvas")
    books("--synthetic_root", type=str,
                        default=os.path.join(os.path.expanduser("~"), ".cache", "smca_detr", "synthetic"))
    parser.add_argument("--synthetic_train_size", type=int, default=512)
    parser.add_argument("--synthetic_val_size", type=int, default=64)
    parser.add_argument("--synthetic_image_size", type=int, default=128)
    parser.add_argument("--synthetic_seed", type=int, default=None,
                        help="seed that generates the synthetic set (default: --seed); fix it when runs differ "
                             "in --seed, so the seeds vary the training, not the data")
    parser.add_argument("--synthetic_preset", default="default", choices=SYNTHETIC_PRESETS,
                        help="multiscale: one large and 2-4 small objects per image, sizes spanning >= 16x "
                             "(docs/multiscale-smca.md; use --synthetic_image_size 256)")
    parser.add_argument("--synthetic_format", default="coco", choices=("coco", "voc"),
                        help="layout the synthetic set is written in and read from")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="skip (and count) unreadable images instead of stopping")

    # run
    books("--output_dir", default="", help="where to save checkpoints, logs and event files")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", default=42, type=int)
    books("--resume", default="", help="checkpoint path, https URL, or 'auto' (<output_dir>/checkpoint.pth if present)")
    parser.add_argument("--finetune_from", default="", help="load model weights only (heads that do not fit are re-initialised)")
    books("--trust_checkpoint", action="store_true",
                        help="allow checkpoints that need full unpickling (only for files you trust)")
    books("--start_epoch", default=0, type=int, metavar="N")
    books("--overwrite", action="store_true",
                        help="start over in an --output_dir that holds a run: deletes its checkpoints, logs and events")
    books("--owner_timeout", default=lease.DEFAULT_TIMEOUT_S, type=number(0.0, low_open=True),
                        metavar="SECONDS",
                        help="a run folder's owner on another host without a heartbeat for this long is taken over "
                             "(docs/training-and-run-folders.md)")
    parser.add_argument("--eval", action="store_true", help="evaluate the weights of --resume and exit")
    books("--save_detections", action="store_true",
                        help="with --eval: write the evaluated split's detections as COCO results "
                             "(<output_dir>/detections.json)")
    parser.add_argument("--eval_untrained", action="store_true",
                        help="allow --eval without --resume: score the untrained model on purpose")
    parser.add_argument("--eval_every", default=1, type=int, help="evaluate every N epochs (and after the last)")
    books("--coco_backend", default="faster_coco_eval", choices=COCO_BACKEND_NAMES,
                        help="COCO scoring: faster_coco_eval (C++, same 12 numbers, several times faster) or "
                             "pycocotools (the reference)")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    # speed (models/acceleration.py): the same weights and, within float32 rounding, the same numbers
    books("--channels_last", action="store_true",
          help="the ResNet trunk and its input in channels-last memory format, for training and evaluation")
    books("--compile", nargs="?", const="inductor", default=None, choices=COMPILE_BACKENDS, metavar="BACKEND",
          help="torch.compile the model with dynamic shapes (one compilation for every image size); BACKEND: "
               "inductor (default), aot_eager or eager")
    books("--log_every", default=20, type=int, help="progress line and TensorBoard point every N steps")
    books("--save_every", default=100, type=int, help="keep checkpoint{epoch:04}.pth every N epochs")
    parser.add_argument("--skip_nonfinite", default=0, type=int,
                        help="skip up to N batches with a non-finite loss (default: stop at the first)")
    parser.add_argument("--max_iters_per_epoch", default=0, type=int, help="cap steps per epoch (0: all; tests)")
    parser.add_argument("--world_size", default=1, type=int, help="set from the launcher's environment")
    books("--dist_url", default="env://")
    return parser


def resolve_loss(args) -> None:
    """cls_loss auto -> focal with a spatial prior, ce without; loss-dependent defaults for coefficients."""
    from models import resolve_cls_loss

    args.cls_loss = resolve_cls_loss(args.cls_loss, args.dynamic_scale)
    for name, value in loss_defaults(args.cls_loss).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


_DEFINITIONS = get_args_parser()
ARCH_FLAGS = architecture_flags(_DEFINITIONS)
MASK_HEAD_FLAGS = marked_flags(_DEFINITIONS, "mask_head")
BOOKKEEPING_FLAGS = marked_flags(_DEFINITIONS, "bookkeeping")
