"""Pascal VOC in its original layout, converted once at build time into the COCO form the loader, the
transforms and the COCO evaluator already use.

Layout under --voc_path (a VOCdevkit folder), for a set ``YEAR-SET`` such as ``2007-trainval``::

    VOC<YEAR>/ImageSets/Main/<SET>.txt   one image id per line
    VOC<YEAR>/Annotations/<id>.xml       size, and per object: name, truncated, difficult, bndbox
    VOC<YEAR>/JPEGImages/<id>.jpg

Boxes: VOC's corners are 1-based pixel indices, both inclusive, so ``xmin=1, xmax=W`` covers the whole image.
In the continuous pixel coordinates of COCO and of the model that is ``[0, W]``: ``x1 = xmin - 1, x2 = xmax``
(and likewise for y), which also makes the devkit's ``+1`` in widths and IoUs unnecessary.

Objects marked ``difficult``: VOC's evaluation neither rewards nor penalises detections on them. In the
converted annotations they carry ``difficult: 1`` and ``iscrowd: 1``, so COCO evaluation ignores them as
well (through its crowd rule) and the loader leaves them out of the training targets, as it leaves out
crowd regions; ``keep_difficult`` (--voc_keep_difficult) marks them ``iscrowd: 0`` so training uses them.
Category ids are 1..K in class-list order (the 20 VOC classes by default), so ``num_classes`` is K + 1.
"""
import contextlib
import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

from util.errors import UserError

from . import annotation_checks
from .coco import CocoDetection

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_CORNERS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class VocObject:
    name: str
    box: tuple  # (x1, y1, x2, y2) in continuous pixel coordinates
    difficult: bool = False
    truncated: bool = False


@dataclass
class VocRecord:
    """One annotation file; width/height are None when the file does not give them."""
    width: int | None
    height: int | None
    objects: list = field(default_factory=list)


def _flag(node, tag: str) -> bool:
    text = node.findtext(tag)
    return text is not None and text.strip() not in ("", "0")


def _size(root, tag: str):
    try:
        value = int(float(root.findtext(f"size/{tag}", "")))
    except ValueError:
        return None
    return value if value > 0 else None


def parse_voc_xml(path, classes, unknown: list | None = None) -> VocRecord:
    """Read one VOC annotation file; ``classes`` are the known class names. Raises UserError (one line,
    naming the file) for a missing or malformed file, an unknown class or a box without numeric corners; with
    an ``unknown`` list, an object of an unknown class is appended there as "<path>: <name>" and skipped instead
    (the check pass lists them all)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file {path} not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserError(f"cannot parse annotation file {path}: {e}") from None
    record = VocRecord(width=_size(root, "width"), height=_size(root, "height"))
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            if unknown is not None:
                unknown.append(f"{path}: {name!r}")
                continue
            raise UserError(f"{path}: unknown class {name!r} ({_known(classes)})")
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{c}")) for c in _CORNERS)
        except (TypeError, ValueError):
            raise UserError(f"{path}: object {name!r} has no numeric bndbox xmin/ymin/xmax/ymax") from None
        record.objects.append(VocObject(name=name, box=(xmin - 1, ymin - 1, xmax, ymax),
                                        difficult=_flag(obj, "difficult"), truncated=_flag(obj, "truncated")))
    return record


def _known(classes) -> str:
    known = ", ".join(classes) if len(classes) <= 20 else f"{', '.join(classes[:20])}, ..."
    return f"known: {known}; set the list with --voc_classes"


def parse_set_list(text: str, flag: str) -> list[tuple[str, str]]:
    """'2007-trainval,2012-trainval' -> [('2007', 'trainval'), ('2012', 'trainval')]."""
    sets = []
    for entry in (e.strip() for e in text.split(",")):
        year, sep, name = entry.partition("-")
        if not (year and sep and name):
            raise UserError(f"{flag} entry {entry!r} must be YEAR-SET, e.g. 2007-trainval")
        sets.append((year, name))
    return sets


def class_list(value) -> tuple:
    """--voc_classes: None (the 20 VOC classes), 'a,b,c', or a file with one name per line."""
    if value is None or value == "":
        return VOC_CLASSES
    path = Path(value).expanduser()
    names = path.read_text().splitlines() if path.is_file() else value.split(",")
    names = tuple(n.strip() for n in names if n.strip())
    source = str(path) if path.is_file() else f"--voc_classes {value!r}"
    if not names:
        raise UserError(f"{source} lists no class names")
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{source} lists class {duplicate!r} twice")
    return names


def _image_set_ids(voc_root: Path, year: str, name: str, flag: str) -> tuple[Path, list[str]]:
    year_dir = voc_root / f"VOC{year}"
    if not year_dir.is_dir():
        raise UserError(f"{year_dir} not found (for {flag} {year}-{name}; --voc_path is the VOCdevkit folder)")
    list_file = year_dir / "ImageSets" / "Main" / f"{name}.txt"
    if not list_file.is_file():
        raise UserError(f"image set file {list_file} not found (for {flag} {year}-{name})")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise UserError(f"image set file {list_file} lists no images")
    return list_file, ids


def load_voc(voc_root, sets, classes, keep_difficult: bool = False, flag: str = "--voc_val") -> COCO:
    """The images listed by ``sets`` [(year, set), ...] and their objects as a pycocotools COCO object, checked
    and repaired as a COCO file is (datasets/check.py; its ``findings``); any error is a UserError. Image ids are
    1..N in listing order; file names are relative to ``voc_root``."""
    coco = read_voc(voc_root, sets, classes, keep_difficult, flag)
    annotation_checks.raise_errors(coco.findings)
    return coco


def read_voc(voc_root, sets, classes, keep_difficult: bool = False, flag: str = "--voc_val") -> COCO:
    """``load_voc`` without raising on error findings: listed images without a file and objects of an unknown
    class are findings (all of them, one line each) like those of a COCO file."""
    voc_root = Path(voc_root).expanduser()
    if not voc_root.is_dir():
        raise UserError(f"--voc_path {voc_root} is not a directory (expects VOC<YEAR>/ folders)")
    category = {name: i for i, name in enumerate(classes, start=1)}
    images, annotations, seen, missing, unknown = [], [], {}, [], []
    for year, name in sets:
        list_file, ids = _image_set_ids(voc_root, year, name, flag)
        for stem in ids:
            key = (year, stem)
            if key in seen:
                raise UserError(f"{list_file} lists VOC{year} image {stem}, already listed by {seen[key]}")
            seen[key] = list_file
            image_path = voc_root / f"VOC{year}" / "JPEGImages" / f"{stem}.jpg"
            xml = voc_root / f"VOC{year}" / "Annotations" / f"{stem}.xml"
            if not image_path.is_file():
                missing.append(f"{stem}: {image_path}")
                continue
            if not xml.is_file():
                raise UserError(f"annotation file {xml} not found ({list_file} lists {stem})")
            record = parse_voc_xml(xml, classes, unknown)
            width, height = record.width, record.height
            if width is None or height is None:  # no <size> in the XML: the image header has it
                try:
                    with Image.open(image_path) as im:
                        width, height = im.size
                except (OSError, UnidentifiedImageError) as e:
                    raise UserError(f"cannot read image {image_path} (for the size {xml} lacks): {e}") from None
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": str(image_path.relative_to(voc_root)),
                           "width": width, "height": height})
            for obj in record.objects:
                x1, y1, x2, y2 = obj.box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category[obj.name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": max(x2 - x1, 0.0) * max(y2 - y1, 0.0),
                    "iscrowd": int(obj.difficult and not keep_difficult),
                    "difficult": int(obj.difficult), "truncated": int(obj.truncated), "voc_xml": str(xml)})
    list_file = voc_root / f"VOC{sets[0][0]}" / "ImageSets" / "Main" / f"{sets[0][1]}.txt"
    findings = []
    if missing:
        findings.append(annotation_checks.Finding(
            "image_files", str(list_file), "listed images without a JPEGImages file", missing,
            "restore the images or remove them from the image set files"))
    if unknown:
        findings.append(annotation_checks.Finding(
            "annotation_categories", str(list_file), "objects of an unknown class", unknown, _known(classes)))
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i, "name": n} for n, i in category.items()]}
    # boxes past the image, degenerate once clipped: dropped from training and evaluation alike
    coco.findings = findings + annotation_checks.check_coco(coco.dataset, str(list_file))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress prints
        coco.createIndex()
    return coco


class VocDetection(CocoDetection):
    """A VOC set through the COCO loader: items, transforms and bad-image handling are CocoDetection's.
    ``class_names``: {category id: name}."""

    def __init__(self, voc_root, sets, classes=VOC_CLASSES, transforms=None, num_classes: int | None = None,
                 skip_bad_images: bool = False, keep_difficult: bool = False, flag: str = "--voc_val"):
        voc_root = Path(voc_root).expanduser()
        coco = load_voc(voc_root, sets, classes, keep_difficult, flag)
        year, name = sets[0]
        # messages about the whole set (e.g. category ids beyond --num_classes) name its first list file
        super().__init__(voc_root, voc_root / f"VOC{year}" / "ImageSets" / "Main" / f"{name}.txt",
                         transforms=transforms, num_classes=num_classes, skip_bad_images=skip_bad_images,
                         coco=coco)
        self.class_names = {i: n for i, n in enumerate(classes, start=1)}


__all__ = ["VOC_CLASSES", "VocDetection", "VocObject", "VocRecord", "class_list", "load_voc", "parse_set_list",
           "parse_voc_xml", "read_voc"]
