"""The annotation check of COCO panoptic files (datasets/check.py has the rest, and the command)."""
from pathlib import Path

from .annotation_checks import Finding, category_findings, image_file_findings, image_findings, repeated

# the checks that apply to a panoptic file, in the command's order (keys of check.CHECKS)
PANOPTIC_CHECKS = ("image_ids", "image_sizes", "file_names", "image_files", "category_ids", "annotation_images",
                   "annotation_categories", "iscrowd", "panoptic_annotations", "panoptic_pngs", "segment_ids")


def check_panoptic(data: dict, file: str, png_folder=None, image_folder=None) -> list:
    """A COCO panoptic JSON: its images, one annotation (PNG) per image, and each image's segments."""
    file = str(file)
    images, annotations = data["images"], data["annotations"]
    found = image_findings(images, file)
    if image_folder is not None:
        found += image_file_findings(images, image_folder, file)
    cat_found, categories = category_findings(data["categories"], file)
    found += cat_found
    image_ids = {image.get("id") for image in images}
    annotated = [a.get("image_id") for a in annotations]
    orphans = [i for i in annotated if i not in image_ids]
    if orphans:
        found.append(Finding("annotation_images", file, "annotations whose image_id is not in 'images'", orphans,
                             "add the images or remove the annotations"))
    twice = repeated(annotated)
    without = [i for i in (image.get("id") for image in images) if i not in set(annotated)]
    if twice or without:
        shown = [f"image {i} twice" for i in twice] + [f"image {i} none" for i in without]
        found.append(Finding("panoptic_annotations", file, "images without exactly one annotation", shown,
                             "give every image one annotation with its PNG and segments_info"))
    pngs = [a.get("file_name") for a in annotations]
    problems = [f"{n} listed twice" for n in repeated(pngs)]
    if png_folder is not None:
        problems += [f"{Path(png_folder) / n} not found" for n in pngs if n and not (Path(png_folder) / n).is_file()]
    if problems:
        found.append(Finding("panoptic_pngs", file, "segment PNGs repeated or missing", problems,
                             "each annotation needs its own PNG in the panoptic folder"))
    unknown, crowd, same_id = [], [], []
    for a in annotations:
        segments = a.get("segments_info", [])
        unknown += [f"image {a.get('image_id')} segment {s.get('id')}: category {s.get('category_id')}"
                    for s in segments if s.get("category_id") not in categories]
        crowd += [f"image {a.get('image_id')} segment {s.get('id')}" for s in segments
                  if s.get("iscrowd", 0) not in (0, 1)]
        same_id += [f"image {a.get('image_id')} segment {i}" for i in repeated([s.get("id") for s in segments])]
    if unknown:
        found.append(Finding("annotation_categories", file, "segments whose category is not in 'categories'",
                             unknown, "add the categories (with 'isthing') or fix the segments"))
    if crowd:
        found.append(Finding("iscrowd", file, "segments with iscrowd other than 0 or 1", crowd,
                             "set iscrowd to 1 for crowd regions and 0 otherwise"))
    if same_id:
        found.append(Finding("segment_ids", file, "segment ids listed twice within an image", same_id,
                             "each segment of an image needs its own id, the one its PNG pixels carry"))
    return found
