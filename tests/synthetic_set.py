"""The small synthetic COCO set the dataset tests share (tests/test_datasets.py, tests/test_coco_bad_input.py):
generated once per test module, and the dataset flags that read it."""
import argparse
import json
from pathlib import Path

import pytest

from datasets.synthetic import ensure_synthetic

SEED, N_TRAIN, N_VAL, SIZE = 3, 16, 8, 64


def ensure_small(root):
    return ensure_synthetic(root, seed=SEED, train_size=N_TRAIN, val_size=N_VAL, image_size=SIZE)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return ensure_small(tmp_path_factory.mktemp("synthetic"))


def dataset_args(**overrides) -> argparse.Namespace:
    args = dict(dataset_file="synthetic", coco_path=None, num_classes=None, skip_bad_images=False,
                synthetic_root=None, synthetic_train_size=N_TRAIN, synthetic_val_size=N_VAL,
                synthetic_image_size=SIZE, seed=SEED, masks=False)
    args.update(overrides)
    return argparse.Namespace(**args)


def load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def xyxy(bbox_xywh):
    x, y, w, h = bbox_xywh
    return [x, y, x + w, y + h]
