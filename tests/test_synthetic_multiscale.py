"""The synthetic preset where scale matters (--synthetic_preset multiscale): object sizes span at least 16x in every
image, it is deterministic and cached under its own name, and the default set is byte-for-byte today's."""
import hashlib
import json
from pathlib import Path

import pytest

import datasets
from datasets.synthetic import MIN_SIZE_SPAN, ensure_synthetic
from tests.conftest import make_args
from util.errors import UserError


def folder_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@pytest.mark.quick
@pytest.mark.parametrize("image_size", [64, 256])
def test_every_image_spans_at_least_16x_in_object_size(tmp_path, image_size):
    root = ensure_synthetic(tmp_path, seed=0, train_size=24, val_size=4, image_size=image_size, preset="multiscale")
    assert root.name.endswith("-multiscale")
    for split in ("train", "val"):
        data = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
        sides = {}
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            assert w == h and 0 <= x and x + w <= image_size and 0 <= y and y + h <= image_size
            sides.setdefault(ann["image_id"], []).append(w)
        assert set(sides) == {image["id"] for image in data["images"]}
        for image_sides in sides.values():
            assert len(image_sides) >= 2
            assert max(image_sides) / min(image_sides) >= MIN_SIZE_SPAN, image_sides


def test_preset_is_deterministic_and_cached(tmp_path):
    first = ensure_synthetic(tmp_path / "a", seed=5, train_size=6, val_size=2, image_size=64, preset="multiscale")
    again = ensure_synthetic(tmp_path / "b", seed=5, train_size=6, val_size=2, image_size=64, preset="multiscale")
    assert folder_hash(first) == folder_hash(again)
    stamp = (first / "annotations" / "instances_train2017.json").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path / "a", seed=5, train_size=6, val_size=2, image_size=64,
                            preset="multiscale") == first
    assert (first / "annotations" / "instances_train2017.json").stat().st_mtime_ns == stamp  # not regenerated


def test_default_set_is_todays(tmp_path):
    """Hash of the whole folder, measured on main before the preset existed (commit 121fa46)."""
    root = ensure_synthetic(tmp_path, seed=3, train_size=6, val_size=3, image_size=64)
    assert root.name == "shapes-v1-seed3-train6-val3-px64"
    assert folder_hash(root) == "1918c3b29f1f1a16"


def test_flag_selects_the_preset_and_is_refused_where_meaningless(tmp_path):
    args = make_args(dataset_file="synthetic", synthetic_preset="multiscale", synthetic_root=str(tmp_path),
                     synthetic_train_size=4, synthetic_val_size=2, synthetic_image_size=64)
    path, size = datasets._synthetic_root(args)
    assert path.name.endswith("-multiscale") and size == 64
    with pytest.raises(UserError, match="--synthetic_preset multiscale"):
        make_args(dataset_file="synthetic", synthetic_preset="multiscale", masks=True)
    with pytest.raises(UserError, match="--synthetic_image_size >= 64"):
        ensure_synthetic(tmp_path, seed=0, train_size=2, val_size=2, image_size=32, preset="multiscale")
