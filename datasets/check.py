"""The annotation check as a command (docs/data-checks.md):

    python -m datasets.check FILE [--images DIR] [--masks] [--pngs DIR]

The same pass a run makes before training (datasets/annotation_checks.py, datasets/check_panoptic.py), with a
summary per check; exit 0 when a run can use the file, 1 on errors. Imports neither torch nor pycocotools.
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from util.errors import UserError

from .annotation_checks import CHECKS, few_ids, check_coco, image_file_findings, segmentation_findings
from .check_panoptic import PANOPTIC_CHECKS, check_panoptic


def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read annotation file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path} is not COCO format (no 'images' list)")
    return data


def run_checks(path, images=None, masks: bool = False, pngs=None) -> tuple:
    """The command's pass over one file, COCO instances or (told by 'segments_info') COCO panoptic: (findings,
    the keys of the checks that ran)."""
    path = Path(path)
    data = _read(path)
    if any("segments_info" in a for a in data.get("annotations", [])):
        for key in ("annotations", "categories"):
            data.setdefault(key, [])
        if pngs is None and (path.parent.parent / path.stem).is_dir():
            pngs = path.parent.parent / path.stem  # DETR's layout: annotations/X.json next to X/
        ran = [k for k in PANOPTIC_CHECKS if k != "image_files" or images is not None]
        return check_panoptic(data, path, pngs, images), ran
    found = check_coco(data, path)
    if masks:
        found += segmentation_findings(data, path)
    if images is not None:
        found += image_file_findings(data["images"], images, str(path), open_images=True)
    ran = [k for k in CHECKS if k not in PANOPTIC_CHECKS[-3:] and (masks or k != "segmentations")
           and (images is not None or k not in ("image_files", "opened_sizes"))]
    return found, ran


def summary(findings: list, ran) -> list:
    """One line per check that ran: 'ok', or the counts and the first few offending ids."""
    lines = []
    by_check = defaultdict(list)
    for f in findings:
        by_check[f.check].append(f)
    for key, title in CHECKS.items():
        if key not in ran:
            continue
        if not by_check[key]:
            lines.append(f"  {title}: ok")
        for f in by_check[key]:
            kind = "error" if f.error else "repaired"
            lines.append(f"  {title}: {kind}: {len(f.ids)} {f.what} ({few_ids(f.ids)}); {f.fix}")
    return lines


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m datasets.check",
        description="Check a COCO-format annotation file (instances or panoptic) the way a run does before "
                    "training; exit 0 when a run can use it, 1 on errors (docs/data-checks.md).")
    parser.add_argument("file", help="the annotation JSON")
    parser.add_argument("--images", help="the image folder: every file must exist; each header is read and its "
                                         "size compared with the declared width/height")
    parser.add_argument("--masks", action="store_true", help="the file is scored for masks (--masks): every "
                                                             "annotation needs a segmentation")
    parser.add_argument("--pngs", help="panoptic files: the PNG folder (default: next to annotations/, as DETR)")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        findings, ran = run_checks(args.file, args.images, args.masks, args.pngs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}:")
    print("\n".join(summary(findings, ran)))
    errors = sum(f.error for f in findings)
    print(f"{errors} error(s), {len(findings) - errors} repair(s)"
          + ("; a run refuses this file until the errors are fixed" if errors else "; a run can use this file"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
