"""Curves from the log.txt of several runs in one PNG: train/test loss, loss components, class_error and COCO AP.

    python experiments/plot_logs.py RUN_DIR_OR_LOG... [--fields loss loss_ce loss_bbox loss_giou class_error AP]
        [--x epoch|images] [--images_per_epoch N] [--out logs.png]

Each argument is a log.txt, a run folder holding one, or a sweep root (every log.txt below it). DETR's
published log.txt files read the same way (one JSON object per epoch with 'epoch', 'train_<name>',
'test_<name>' and 'test_coco_eval_bbox', the 12 COCOeval numbers).

A field F plots train_F (solid) and test_F (dashed) where the logs have them; a COCO metric name (AP, AP50,
..., ARl; 'mAP' is AP) plots that entry of test_coco_eval_bbox. One panel per field, one colour per run.
x is epochs done (epoch + 1, TensorBoard's epoch axis) or images seen: 'images_seen' of this repo's log.txt,
or epochs done x --images_per_epoch for logs without it (DETR's; COCO train2017 has 118287 images).

experiments/compare.py --plot loss draws the same panels with one mean curve and band per group of seeds
(plot_groups).
"""
import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    # Run as a script (python experiments/plot_logs.py): make the repo's top-level packages importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.errors import UserError
from util.tb import COCO_METRIC_NAMES

DEFAULT_FIELDS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "AP")
COCO_KEY = "test_coco_eval_bbox"
X_AXES = ("epoch", "images")
BANDS = ("std", "minmax", "none")
# the colour cycle has 10 colours; groups 10 apart differ by marker
MARKERS = (None, "o", "s", "^")
Curve = Tuple[List[float], List[float]]  # (x values, y values), x increasing


def read_log(path: str) -> List[dict]:
    """The epochs of a log.txt, one dict each, in epoch order (the last line of an epoch logged twice wins).
    A torn last line (a run killed mid-write, or still writing) is skipped; any other bad line is an error."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    by_epoch = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise UserError(f"{path}:{number}: not a JSON object; log.txt holds one JSON object per line") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise UserError(f"{path}:{number}: no 'epoch' key; is this a DETR-style log.txt?")
        by_epoch[int(record["epoch"])] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def find_logs(paths: Sequence[str]) -> List[Tuple[str, str]]:
    """[(label, log.txt path)]: a file as given, a folder's own log.txt, else every log.txt below it; labels are
    folders relative to the path given (its own name for a run folder), or a file's name without extension."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            # run/log.txt is named after its run; a downloaded detr-r50_log.txt after itself
            name = os.path.basename(path)
            label = os.path.basename(os.path.dirname(os.path.abspath(path))) if name == "log.txt" else \
                os.path.splitext(name)[0]
            found.append((label, path))
            continue
        if not os.path.isdir(path):
            raise UserError(f"{path}: no such file or directory; pass a log.txt, a run folder or a sweep root")
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            if "log.txt" in filenames:
                rel = os.path.relpath(dirpath, path)
                label = os.path.basename(os.path.abspath(path)) if rel == "." else rel
                found.append((label, os.path.join(dirpath, "log.txt")))
    if not found:
        raise UserError(f"no log.txt found under: {' '.join(paths)}")
    return found


def _coco_index(field: str) -> Optional[int]:
    name = "AP" if field.lower() == "map" else field
    for i, metric in enumerate(COCO_METRIC_NAMES):
        if metric.lower() == name.lower():
            return i
    return None


def field_curves(records: List[dict], field: str, x: str = "epoch",
                 images_per_epoch: Optional[int] = None, source: str = "log.txt") -> Dict[str, Curve]:
    """{'train': curve, 'test': curve} of one field (either may be missing); see the module docstring."""
    index = _coco_index(field)
    keys = {"test": COCO_KEY} if index is not None else {"train": f"train_{field}", "test": f"test_{field}"}
    curves = {}
    for split, key in keys.items():
        xs, ys = [], []
        for record in records:
            value = record.get(key)
            if value is None:
                continue
            value = value[index] if index is not None else value
            # pycocotools writes -1 for a metric without objects (e.g. APl on small images): no point
            if not isinstance(value, (int, float)) or not math.isfinite(value) or (index is not None and value < 0):
                continue
            xs.append(_x_value(record, x, images_per_epoch, source))
            ys.append(float(value))
        if xs:
            curves[split] = (xs, ys)
    return curves


def _x_value(record: dict, x: str, images_per_epoch: Optional[int], source: str) -> float:
    epochs_done = int(record["epoch"]) + 1
    if x == "epoch":
        return epochs_done
    if "images_seen" in record:
        return record["images_seen"]
    if images_per_epoch:
        return epochs_done * images_per_epoch
    raise UserError(f"{source} has no 'images_seen' (DETR's logs do not); pass --images_per_epoch N "
                    f"(e.g. 118287 for COCO train2017 with DETR's settings) or use --x epoch")


def aggregate(curves: Sequence[Curve], band: str = "std") -> Tuple[List[float], List[float], List[float], List[float]]:
    """(x, mean, low, high) over the x values every curve has. low/high: mean -+ sample std, or min/max; equal
    to the mean for a single curve or band 'none'."""
    common = sorted(set.intersection(*(set(xs) for xs, _ in curves))) if curves else []
    lookups = [dict(zip(xs, ys)) for xs, ys in curves]
    mean, low, high = [], [], []
    for x in common:
        values = [lookup[x] for lookup in lookups]
        m = statistics.fmean(values)
        if band == "minmax":
            lo, hi = min(values), max(values)
        elif band == "std" and len(values) > 1:
            s = statistics.stdev(values)
            lo, hi = m - s, m + s
        else:
            lo = hi = m
        mean.append(m)
        low.append(lo)
        high.append(hi)
    return common, mean, low, high


def draw(ax, curves: Sequence[Curve], label: str, color, band: str, linestyle: str = "-", marker=None) -> bool:
    """One run (a single curve) or a group's mean and band on ``ax``; False when there is nothing to draw."""
    xs, mean, low, high = aggregate(curves, band)
    if not xs:
        return False
    ax.plot(xs, mean, color=color, linestyle=linestyle, marker=marker, markersize=3, label=label)
    if len(curves) > 1 and band != "none":
        ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    return True


def plot_groups(path: str, groups: Sequence[Tuple[str, List[List[dict]]]], fields: Sequence[str] = DEFAULT_FIELDS,
                x: str = "epoch", band: str = "std", images_per_epoch: Optional[int] = None,
                sources: Optional[Sequence[str]] = None) -> None:
    """One panel per field; per group (label, [records of each run]) its train (solid) and test (dashed) curve,
    the mean with a band when the group has several runs. Raises UserError when no log has a field."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    sources = sources or [label for label, _ in groups]
    per_field = {}
    for field in fields:
        per_field[field] = [
            [field_curves(records, field, x, images_per_epoch, source) for records in runs]
            for (_, runs), source in zip(groups, sources)]
        if not any(curves for group in per_field[field] for curves in group):
            keys = sorted({key for _, runs in groups for records in runs for record in records for key in record})
            raise UserError(f"field {field!r}: no log has train_{field}, test_{field} or a COCO metric of that "
                            f"name; keys in the logs: {' '.join(keys)}")
    columns = min(3, len(fields))
    rows = math.ceil(len(fields) / columns)
    fig = Figure(figsize=(5 * columns, 3.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for panel, field in enumerate(fields):
        ax = fig.add_subplot(rows, columns, panel + 1)
        for g, group_curves in enumerate(per_field[field]):
            marker = MARKERS[g // 10 % len(MARKERS)]
            for split, style in (("train", "-"), ("test", "--")):
                curves = [curves[split] for curves in group_curves if split in curves]
                draw(ax, curves, None, colors[g], band, style, marker)
        ax.set_title(field if _coco_index(field) is None else f"test {field} (COCO bbox)")
        ax.set_xlabel("epochs done" if x == "epoch" else "images seen")
        if x == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if panel == 0:
            handles = [Line2D([], [], color=c, marker=MARKERS[g // 10 % len(MARKERS)],
                              label=label if len(runs) == 1 else f"{label} (mean of {len(runs)}, band: {band})")
                       for g, (c, (label, runs)) in enumerate(zip(colors, groups))]
            handles += [Line2D([], [], color="grey", linestyle="-", label="train"),
                        Line2D([], [], color="grey", linestyle="--", label="test")]
            ax.legend(handles=handles, fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python experiments/plot_logs.py", allow_abbrev=False,
                                     description="Plot log.txt curves of several runs (this repo's or DETR's).")
    parser.add_argument("paths", nargs="+", metavar="LOG_OR_DIR", help="log.txt files, run folders or sweep roots")
    parser.add_argument("--fields", nargs="+", default=list(DEFAULT_FIELDS),
                        help=f"log keys without train_/test_, or COCO metrics (default: {' '.join(DEFAULT_FIELDS)})")
    parser.add_argument("--x", choices=X_AXES, default="epoch", help="epochs done or images seen")
    parser.add_argument("--images_per_epoch", type=int, default=None,
                        help="for --x images with logs that lack 'images_seen' (DETR's)")
    parser.add_argument("--out", default="logs.png", help="PNG to write (default: logs.png)")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.images_per_epoch is not None and args.images_per_epoch <= 0:
        raise UserError(f"--images_per_epoch must be positive, got {args.images_per_epoch}")
    logs = find_logs(args.paths)
    groups = [(label, [read_log(path)]) for label, path in logs]
    plot_groups(args.out, groups, args.fields, args.x, images_per_epoch=args.images_per_epoch,
                sources=[path for _, path in logs])
    print(f"wrote {args.out} ({len(logs)} runs: {', '.join(label for label, _ in logs)})")


def cli(argv=None) -> int:
    """The command line: exit code 2 with one line for bad input."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
