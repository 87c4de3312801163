"""predict.py --onnx: an ONNX file written by export.py gives the detections and pictures of its checkpoint, and the
one-line refusals (--attention, a file exported with --postprocess or not by export.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import export
import predict
from models import build_detr, detr_kwargs
from test_predict import val_set

pytest.importorskip("onnxruntime", reason="the export extra (requirements-export.txt) is not installed")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def onnx_file(tiny_checkpoint, tmp_path_factory, single_thread):
    """The session's trained tiny SMCA checkpoint (type2, both mixtures, focal) exported to ONNX."""
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert export.cli(["--resume", str(tiny_checkpoint[0]), "--output", str(path), "--no_check"]) == 0
    return path


def images_of(synthetic_root, count=3):
    return sorted(val_set(synthetic_root).img_folder.glob("*.jpg"))[:count]


def test_onnx_gives_the_checkpoints_detections_and_pictures(tiny_checkpoint, onnx_file, tmp_path):
    path, synthetic_root = tiny_checkpoint
    images = [str(p) for p in images_of(synthetic_root)]
    common = [*images, "--threshold", "0"]
    assert predict.cli(["--resume", str(path), "--output_dir", str(tmp_path / "torch"), *common]) == 0
    assert predict.cli(["--onnx", str(onnx_file), "--output_dir", str(tmp_path / "onnx"), *common]) == 0
    want = json.loads((tmp_path / "torch" / "detections.json").read_text())
    got = json.loads((tmp_path / "onnx" / "detections.json").read_text())
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in ("score", "bbox")} == \
               {k: v for k, v in w.items() if k not in ("score", "bbox")}
        assert abs(g["score"] - w["score"]) < 1e-5
        assert np.allclose(g["bbox"], w["bbox"], atol=1e-3)  # pixels
    pictures = sorted(p.name for p in (tmp_path / "torch").glob("*.png"))
    assert pictures == sorted(p.name for p in (tmp_path / "onnx").glob("*.png")) and len(pictures) == len(images)
    for name in pictures:
        with Image.open(tmp_path / "torch" / name) as a, Image.open(tmp_path / "onnx" / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_attention_needs_the_checkpoint(onnx_file, tmp_path, capsys, tiny_checkpoint):
    image = str(images_of(tiny_checkpoint[1], 1)[0])
    assert predict.cli(["--onnx", str(onnx_file), image, "--output_dir", str(tmp_path), "--attention"]) == 2
    assert capsys.readouterr().err == ("error: --attention reads the PyTorch model's attention with hooks; an --onnx "
                                       "graph has none: pass the checkpoint with --resume instead\n")


def test_a_file_not_from_export_py_is_one_line(tmp_path, capsys, tiny_checkpoint):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    image = str(images_of(tiny_checkpoint[1], 1)[0])
    assert predict.cli(["--onnx", str(tmp_path / "other.onnx"), image, "--output_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"error: --onnx {tmp_path / 'other.onnx'} was not written by export.py (no "
                                       f"'smca_detr' metadata): export it with python export.py --format onnx\n")
    assert predict.cli(["--onnx", str(tmp_path / "broken.onnx"), image, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --onnx {tmp_path / 'broken.onnx'}: cannot read it as an ONNX model (")
    assert err.count("\n") == 1


def test_a_postprocessed_export_is_refused_in_one_line(onnx_file, tmp_path, capsys, tiny_checkpoint):
    """The metadata of a --postprocess export lists the scored outputs; predict.py needs the raw ones."""
    import onnx

    proto = onnx.load(onnx_file)
    entry = next(p for p in proto.metadata_props if p.key == "smca_detr")
    meta = json.loads(entry.value)
    entry.value = json.dumps({**meta, "outputs": ["scores", "labels", "boxes", "queries"]})
    onnx.save(proto, tmp_path / "scored.onnx")
    image = str(images_of(tiny_checkpoint[1], 1)[0])
    assert predict.cli(["--onnx", str(tmp_path / "scored.onnx"), image, "--output_dir", str(tmp_path / "o")]) == 2
    assert "was exported with --postprocess; predict.py reads the raw outputs" in capsys.readouterr().err


@pytest.mark.quick
def test_resume_and_onnx_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        predict.get_args_parser().parse_args(["a.jpg", "--output_dir", "o", "--resume", "c.pth", "--onnx", "m.onnx"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.get_args_parser().parse_args(["a.jpg", "--output_dir", "o"])


def test_a_segmentation_export_draws_the_same_panoptic_pictures(tiny_checkpoint, tmp_path):
    """A --masks checkpoint (random mask head, one stuff class) exported with its masks: predict.py --onnx writes
    the detections and the panoptic pictures of the checkpoint."""
    path, synthetic_root = tiny_checkpoint
    stored = torch.load(path, map_location="cpu", weights_only=True)
    config = {**stored["config"], "masks": True, "dynamic_scale": "none", "head_mixture": False,
              "query_mixture": False, "cls_loss": "ce", "panoptic_threshold": 0.1, "dec_layers": 1}
    torch.manual_seed(0)
    model = build_detr(**{**detr_kwargs(config), "freeze_detector": False})
    torch.save({"model": model.state_dict(), "config": config, "class_names": stored["class_names"],
                "stuff_ids": [1]}, tmp_path / "segm.pth")
    assert export.cli(["--resume", str(tmp_path / "segm.pth"), "--output", str(tmp_path / "segm.onnx"),
                       "--no_check"]) == 0
    images = [str(p) for p in images_of(synthetic_root, 2)]
    assert predict.cli(["--resume", str(tmp_path / "segm.pth"), *images, "--output_dir", str(tmp_path / "torch")]) == 0
    assert predict.cli(["--onnx", str(tmp_path / "segm.onnx"), *images, "--output_dir", str(tmp_path / "onnx")]) == 0
    pictures = sorted(p.name for p in (tmp_path / "torch").glob("*_panoptic.png"))
    assert len(pictures) == 2 and pictures == sorted(p.name for p in (tmp_path / "onnx").glob("*_panoptic.png"))
    for name in pictures:
        with Image.open(tmp_path / "torch" / name) as a, Image.open(tmp_path / "onnx" / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name
