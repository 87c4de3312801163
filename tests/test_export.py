"""export.py: ONNX (dynamo exporter, run by onnxruntime) and torch.export files of tiny random models, DETR and SMCA
on both prior routes, the segmentation model, and the in-graph scoring; each exported file against the PyTorch
model on mixed-size batches it was not traced with, and the one-line errors. One export per variant, shared by
the module (an export takes tens of seconds on a loaded 2-core machine)."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export
import inference
from models import build_model
from models.deploy import output_names
from models.postprocess import PostProcess, PostProcessFocal
from tests.conftest import make_args
from util.misc import nested_tensor_from_tensor_list
from rundir.run_config import config_to_dict

pytest.importorskip("onnxruntime", reason="the export extra (requirements-export.txt) is not installed")

ROOT = Path(__file__).resolve().parents[1]
# the smallest model that still has every part: one encoder and one decoder layer
SMALL = {"enc_layers": 1, "dec_layers": 1, "dropout": 0.0}
# name -> (flags, --format, --postprocess); the SMCA types, mixtures, --smooth and routes not listed here export
# alike (docs/export.md has the parity of every variant on both routes)
VARIANTS = {
    "type1-torch_export": ({"dynamic_scale": "type1"}, "torch_export", False),
    "detr": ({}, "onnx", False),
    "type2-fused-topk": ({"dynamic_scale": "type2", "prior_impl": "fused"}, "onnx", True),
    "type4-both-explicit": ({"dynamic_scale": "type4", "head_mixture": True, "query_mixture": True,
                             "smooth": 4, "prior_impl": "explicit"}, "onnx", False),
    "detr-masks-softmax": ({"masks": True}, "onnx", True),
}
TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("single_thread")


def write_checkpoint(path: Path, **flags) -> Path:
    torch.manual_seed(0)
    args = make_args(**SMALL, **flags)
    model = build_model(args)[0]
    torch.save({"model": model.state_dict(), "config": config_to_dict(args)}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, single_thread):
    """name -> (checkpoint, exported file, export.py's stdout), exported on first use."""
    folder = tmp_path_factory.mktemp("export")
    done = {}

    def get(name):
        if name not in done:
            flags, fmt, postprocess = VARIANTS[name]
            checkpoint = write_checkpoint(folder / f"{name}.pth", **flags)
            output = folder / f"{name}.{'onnx' if fmt == 'onnx' else 'pt2'}"
            argv = ["--resume", str(checkpoint), "--format", fmt, "--output", str(output)]
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                code = export.cli(argv + (["--postprocess"] if postprocess else []))
            assert code == 0, buffer.getvalue()
            done[name] = (checkpoint, output, buffer.getvalue())
        return done[name]

    return get


def mixed_batch(seed=7):
    """Two images of sizes the export never saw, as a list (DETR's API) and as the graph's padded inputs."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 96, 160, generator=generator), torch.randn(3, 128, 112, generator=generator)]
    return images, nested_tensor_from_tensor_list(images).decompose()


def run_exported(path: Path, fmt: str, images, mask):
    return export.exported_runner(str(path), fmt)(images, mask)


def scored(outputs, cls_loss: str, num_select: int):
    """The post-processor's detections per image at target size 1 x 1 (boxes normalised xyxy)."""
    postprocessor = PostProcessFocal(num_select) if cls_loss == "focal" else PostProcess()
    return postprocessor(outputs, torch.ones(len(outputs["pred_logits"]), 2))


@pytest.mark.parametrize("name", VARIANTS)
def test_exported_file_matches_pytorch_on_a_new_mixed_size_batch(exported, name):
    """The check export.py printed passed, and on a batch of other sizes the exported file gives the outputs of
    the PyTorch model called on the list of images; scored graphs give the post-processor's detections."""
    flags, fmt, postprocess = VARIANTS[name]
    checkpoint, path, stdout = exported(name)
    check = [line for line in stdout.splitlines() if line.startswith("check (")]
    assert len(check) == 1 and check[0].endswith(": ok"), stdout
    print(f"{name}: {check[0]}")  # the parity export.py measured (pytest -s shows it)
    detector = inference.load_detector(str(checkpoint))
    images, (padded, mask) = mixed_batch()
    got = dict(zip(output_names(postprocess, flags.get("masks", False)), run_exported(path, fmt, padded, mask)))
    with torch.no_grad():
        want = detector.model(images)  # the list form: the model pads it itself
    raw = ("pred_masks",) if postprocess else ("pred_logits", "pred_boxes", "pred_masks")
    for key in (k for k in raw if k in got):
        assert got[key].shape == want[key].shape
        assert float((got[key] - want[key]).abs().max()) <= TOLERANCE, key
    if not postprocess:
        return
    num_classes = want["pred_logits"].shape[-1] - 1
    for index, expected in enumerate(scored(want, detector.cls_loss, detector.postprocessor.num_select or 0)):
        real = got["labels"][index] != num_classes  # focal: the graph keeps no-object pairs, the caller drops them
        assert torch.equal(got["labels"][index][real], expected["labels"])
        assert torch.equal(got["queries"][index][real], expected["queries"])
        torch.testing.assert_close(got["scores"][index][real], expected["scores"], rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(got["boxes"][index][real], expected["boxes"], rtol=0, atol=TOLERANCE)


def test_onnx_file_carries_what_a_detector_needs(exported):
    """load_onnx_detector rebuilds the checkpoint's Detector around the graph: same configuration, class names and
    post-processor, and its model takes DETR's input forms."""
    checkpoint, path, _ = exported("detr")
    detector = inference.load_detector(str(checkpoint))
    onnx_detector = inference.load_onnx_detector(str(path))
    assert onnx_detector.config == json.loads(json.dumps(detector.config, default=str))
    assert onnx_detector.class_names == detector.class_names and onnx_detector.cls_loss == "ce"
    assert type(onnx_detector.postprocessor) is type(detector.postprocessor)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = detector.model(images)
    got = onnx_detector.model(images)
    assert set(got) == {"pred_logits", "pred_boxes"}
    torch.testing.assert_close(got["pred_logits"], want["pred_logits"], rtol=0, atol=TOLERANCE)


def test_help_imports_no_torch():
    code = "import sys, export\ntry:\n    export.cli(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n" \
           "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--format {onnx,torch_export}" in result.stdout and result.stdout.strip().endswith("False")


@pytest.mark.quick
def test_without_the_export_packages_one_line_says_what_to_install(tmp_path, monkeypatch, capsys):
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    assert export.cli(["--resume", "x.pth", "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --format onnx needs onnxruntime: pip install -e .[export] (or pip install -r " \
                  "requirements-export.txt)\n"
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.quick
def test_a_missing_output_folder_is_one_line(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "detr.pth")
    assert export.cli(["--resume", str(checkpoint), "--output", str(tmp_path / "no" / "m.onnx")]) == 2
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'no' / 'm.onnx'}: the folder {tmp_path / 'no'} " \
                                      f"does not exist\n"


def test_an_exporter_failure_is_one_line(tmp_path, monkeypatch, capsys):
    checkpoint = write_checkpoint(tmp_path / "detr.pth")

    def fail(*args, **kwargs):
        raise torch.onnx.OnnxExporterError("Failed to decompose the FX graph\nthe long report")

    monkeypatch.setattr(torch.onnx, "export", fail)
    assert export.cli(["--resume", str(checkpoint), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err == "error: the ONNX exporter cannot export this model (Failed to decompose the FX graph); try " \
                  "--format torch_export\n"


def test_a_detr_hub_name_means_its_published_checkpoint(tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "detr.pth")
    monkeypatch.setitem(inference.DETR_CHECKPOINTS, "detr_resnet50", (str(checkpoint), {"backbone": "resnet18"}))
    detector = export.load("detr_resnet50", trust=False)
    assert detector.source == str(checkpoint) and detector.config["backbone"] == "resnet18"
