"""hubconf.py through torch.hub.load(source='local'), as a user of a clone calls it: DETR's checkpoint layout for
every DETR entry, the SMCA entry built fresh and from a checkpoint, and the offline error of pretrained=True."""
from pathlib import Path

import pytest
import torch

import inference
from test_detr_layout import RESNET_DEPTHS, assert_checkpoint_layout, detr_checkpoint_shapes
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")

DETR_ENTRIES = {"detr_resnet50": ("resnet50", 32), "detr_resnet50_dc5": ("resnet50", 16),
                "detr_resnet101": ("resnet101", 32), "detr_resnet101_dc5": ("resnet101", 16)}


def hub_load(entry, **kwargs):
    return torch.hub.load(str(ROOT), entry, source="local", **kwargs)


@pytest.mark.parametrize("entry", DETR_ENTRIES)
def test_detr_entries_have_the_official_checkpoint_layout(entry):
    backbone, stride = DETR_ENTRIES[entry]
    model, postprocessor = hub_load(entry, pretrained=False, backbone_weights="none", return_postprocessor=True)
    assert_checkpoint_layout(model, detr_checkpoint_shapes(RESNET_DEPTHS[backbone]))
    assert model.backbone.stride == stride
    assert type(postprocessor).__name__ == "PostProcess"  # DETR's softmax post-processor


def test_smca_entry_is_detr_plus_the_prior_parameters():
    model, postprocessor = hub_load("smca_resnet50", backbone_weights="none", return_postprocessor=True)
    state = model.state_dict()
    table = detr_checkpoint_shapes(RESNET_DEPTHS["resnet50"], num_queries=300)
    assert {k: tuple(state[k].shape) for k in table} == table
    extra = sorted(set(state) - set(table))
    assert extra and all(k.startswith(("transformer.decoder.reference.", "transformer.decoder.priors.")) for k in extra)
    assert "transformer.decoder.priors.5.scale.proj.weight" in extra  # type2: one scale per head
    # focal classifier: bias at -log(99), and the top-k (query, class) post-processor
    torch.testing.assert_close(model.class_embed.bias, torch.full((92,), -torch.log(torch.tensor(99.0)).item()))
    assert type(postprocessor).__name__ == "PostProcessFocal"


def test_smca_entry_loads_a_checkpoint_of_this_fork(tiny_checkpoint):
    path, _ = tiny_checkpoint
    model = hub_load("smca_resnet50", checkpoint=str(path))
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert model.num_queries == 10  # from the checkpoint, not the entry's default 300
    with pytest.raises(UserError, match="--num_queries 100 conflicts with the checkpoint's 10"):
        hub_load("smca_resnet50", checkpoint=str(path), num_queries=100)


@pytest.mark.quick
def test_pretrained_offline_is_one_clear_line(tmp_path, monkeypatch):
    """The download fails at once (nothing listens on the discard port); the message says where to put the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = "https://127.0.0.1:9/detr-r50-e632da11.pth"
    monkeypatch.setitem(inference.DETR_CHECKPOINTS, "detr_resnet50",
                        (url, inference.DETR_CHECKPOINTS["detr_resnet50"][1]))
    with pytest.raises(UserError) as info:
        hub_load("detr_resnet50", pretrained=True)
    message = str(info.value)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "detr-r50-e632da11.pth"
    assert message.startswith(f"could not download {url} (") and "\n" not in message
    assert message.endswith(f"put it at {cached} (torch.hub's cache), then call again")


def test_pretrained_with_other_class_count_points_to_finetuning():
    with pytest.raises(UserError, match="--finetune_from https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth "
                                        "--num_classes 5"):
        hub_load("detr_resnet50", pretrained=True, num_classes=5)


@pytest.mark.quick
def test_coco_class_names_entry():
    names = hub_load("coco_class_names")
    assert len(names) == 80 and names[1] == "person" and names[90] == "toothbrush"
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(names)  # COCO's unused ids


def test_the_readme_snippet_runs_on_a_hub_model():
    """docs/inference-and-hub.md's three lines (with a random model: no download), on two images of different sizes."""
    torch.manual_seed(0)
    model, postprocess = hub_load("detr_resnet50", pretrained=False, backbone_weights="none",
                                  return_postprocessor=True)
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 64)]
    with torch.no_grad():
        outputs = model.eval()(images)
    detections = postprocess(outputs, torch.tensor([[480, 720], [600, 480]]))
    assert [d["boxes"].shape for d in detections] == [(100, 4), (100, 4)]
    assert detections[0]["boxes"][:, 2].max() <= 720 and detections[1]["boxes"][:, 3].max() <= 600
    assert all(((d["scores"] > 0) & (d["scores"] < 1)).all() for d in detections)
