"""predict.py end to end on synthetic images with a tiny trained checkpoint: the JSON equals the model and its
post-processor run directly, the pictures decode at the image's size, the attention figure's arrays are the
model's own attention and spatial prior, a segmentation checkpoint's panoptic picture is the post-processor's
segmentation drawn, and bad input is one line."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from datasets.coco import CocoDetection
from datasets.transforms import make_coco_transforms, scaled_coco_transform_params
from inference import load_detector
from models import build_detr, detr_kwargs
from models.attention_maps import co_attention_maps
from tests.cli import run_script
from util.misc import nested_tensor_from_tensor_list
from visualize import class_colour, draw_panoptic, layout_tags, query_panels

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]


def run_predict(*argv):
    return run_script("predict", argv)


def val_set(synthetic_root):
    """The validation images through the dataset's own loader and transform (with their targets)."""
    (folder,) = Path(synthetic_root).glob("shapes-*/val2017")
    return CocoDetection(folder, folder.parent / "annotations" / "instances_val2017.json",
                         transforms=make_coco_transforms("val", **scaled_coco_transform_params(64)))


@pytest.fixture(scope="module")
def predicted(tiny_checkpoint, tmp_path_factory):
    """predict.py on three validation images given one by one and a copy of the folder, threshold 0."""
    path, synthetic_root = tiny_checkpoint
    dataset = val_set(synthetic_root)
    out = tmp_path_factory.mktemp("predicted")
    files = [dataset.img_folder / dataset.coco.imgs[i]["file_name"] for i in dataset.ids[:3]]
    result = run_predict("--resume", path, *files, "--output_dir", out, "--threshold", "0", "--attention",
                         "--attention_top", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout, dataset


def test_json_equals_model_and_postprocessor_run_directly(predicted, tiny_checkpoint):
    out, _, dataset = predicted
    records = json.loads((out / "detections.json").read_text())
    checkpoint = torch.load(tiny_checkpoint[0], map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    # an independent model: the stored flags through build_detr, the weights loaded by hand
    model = build_detr(backbone=config["backbone"], hidden_dim=config["hidden_dim"], nheads=config["nheads"],
                       enc_layers=config["enc_layers"], dec_layers=config["dec_layers"],
                       dim_feedforward=config["dim_feedforward"], num_queries=config["num_queries"],
                       num_classes=config["num_classes"], dynamic_scale=config["dynamic_scale"],
                       head_mixture=config["head_mixture"], query_mixture=config["query_mixture"],
                       backbone_norm=config["backbone_norm"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    postprocessor = load_detector(str(tiny_checkpoint[0])).postprocessor
    for index, image_id in enumerate(dataset.ids[:3]):
        image, target = dataset[index]
        with torch.no_grad():
            want = postprocessor(model(nested_tensor_from_tensor_list([image])), target["orig_size"][None])[0]
        got = [r for r in records if r["image_id"] == image_id]  # file names are numbers: they are the ids
        assert len(got) == len(want["scores"]) > 0  # threshold 0: everything the post-processor returns
        order = want["scores"].argsort(descending=True, stable=True)
        torch.testing.assert_close(torch.tensor([r["score"] for r in got]), want["scores"][order])
        x0, y0, x1, y1 = want["boxes"][order].unbind(-1)
        torch.testing.assert_close(torch.tensor([r["bbox"] for r in got]), torch.stack([x0, y0, x1 - x0, y1 - y0], -1))
        assert [r["category_id"] for r in got] == want["labels"][order].tolist()
        assert {r["file_name"] for r in got} == {dataset.coco.imgs[image_id]["file_name"]}
        names = checkpoint["class_names"]  # id 0 is a class index without a category
        assert [r["category_name"] for r in got] == [names.get(r["category_id"], f"class {r['category_id']}")
                                                     for r in got]


def test_pictures_decode_at_the_image_size(predicted):
    out, _, dataset = predicted
    for image_id in dataset.ids[:3]:
        info = dataset.coco.imgs[image_id]
        stem = Path(info["file_name"]).stem
        with Image.open(out / f"{stem}_boxes.png") as boxes:
            boxes.load()
            assert boxes.size == (info["width"], info["height"]) and boxes.format == "PNG"
        with Image.open(out / f"{stem}_attention.png") as figure:
            figure.load()
            assert figure.format == "PNG" and figure.width > 4 * info["width"]


def test_progress_has_a_count_and_an_eta(predicted):
    out, stdout, _ = predicted
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[1/3] ") and lines[-1].startswith("[3/3] ")
    assert all(" s/image | ETA " in line for line in lines)
    records = json.loads((out / "detections.json").read_text())
    assert f"wrote {len(records)} detections of 3 images" in stdout


def test_threshold_keeps_the_detections_at_or_above_it(predicted, tiny_checkpoint, tmp_path):
    out, _, dataset = predicted
    everything = json.loads((out / "detections.json").read_text())
    scores = sorted((r["score"] for r in everything if r["image_id"] == dataset.ids[0]), reverse=True)
    # halfway across the widest gap in the middle of the scores: rounding cannot move a score across it
    middle = range(len(scores) // 4, 3 * len(scores) // 4)
    gap = max(middle, key=lambda i: scores[i] - scores[i + 1])
    threshold = (scores[gap] + scores[gap + 1]) / 2
    image = dataset.img_folder / dataset.coco.imgs[dataset.ids[0]]["file_name"]
    assert predict.cli(["--checkpoint", str(tiny_checkpoint[0]), str(image), "--output_dir", str(tmp_path),
                        "--threshold", str(threshold)]) == 0
    kept = json.loads((tmp_path / "detections.json").read_text())
    expected = [r for r in everything if r["image_id"] == dataset.ids[0] and r["score"] >= threshold]
    assert 0 < len(kept) < len(scores) and len(kept) == len(expected)
    # this process runs one thread, the script two: the sums round differently, so numbers are compared closely
    fields = ("image_id", "category_id", "file_name", "category_name")
    assert [[r[f] for f in fields] for r in kept] == [[r[f] for f in fields] for r in expected]
    torch.testing.assert_close(torch.tensor([r["bbox"] + [r["score"]] for r in kept]),
                               torch.tensor([r["bbox"] + [r["score"]] for r in expected]))
    assert not (tmp_path / f"{image.stem}_attention.png").exists()  # no --attention


def capture_inputs(module):
    """A forward pre-hook keeping the (args, kwargs) of ``module``'s calls."""
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    return calls, handle


def test_attention_figure_arrays_are_the_models_prior_and_attention(tiny_checkpoint):
    path, synthetic_root = tiny_checkpoint
    detector = load_detector(str(path))
    model = detector.model
    dataset = val_set(synthetic_root)
    image, target = dataset[0]
    samples = nested_tensor_from_tensor_list([image])
    decoder = model.transformer.decoder
    prior_calls, h1 = capture_inputs(decoder.priors[-1])
    attn_calls, h2 = capture_inputs(decoder.layers[-1].multihead_attn)
    outputs, maps = co_attention_maps(model, samples)
    h1.remove()
    h2.remove()
    (prior_args, _), = prior_calls
    (attn_args, attn_kwargs), = attn_calls
    with torch.no_grad():
        G = decoder.priors[-1].log_prior(*prior_args)  # (1, nhead, Q, HW): SpatialPrior's explicit G
        routed = decoder.priors[-1](*prior_args)  # what the forward pass used: G, or its factors (fused route)
    torch.testing.assert_close(getattr(routed, "dense", lambda: routed)(), G, rtol=0, atol=1e-5)
    height, width = image.shape[-2:]
    cells_h, cells_w = -(-height // 32), -(-width // 32)
    input_size, image_size = (height, width), tuple(target["orig_size"].tolist())
    nhead, queries = 4, 10

    # the plain reference of the co-attention: softmax(q k^T / sqrt(d_h) + G + padding) per head
    query, key = attn_args[0], attn_args[1]
    w_q, w_k, _ = decoder.layers[-1].multihead_attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = decoder.layers[-1].multihead_attn.in_proj_bias.chunk(3)
    q = (query @ w_q.T + b_q)[:, 0].view(queries, nhead, -1).transpose(0, 1)  # (nhead, Q, d_h)
    k = (key @ w_k.T + b_k)[:, 0].view(cells_h * cells_w, nhead, -1).transpose(0, 1)  # (nhead, HW, d_h)
    assert not attn_kwargs["key_padding_mask"].any()  # one image: no padding
    attention = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + G[0]).softmax(-1)  # (nhead, Q, HW)

    for query_index in range(queries):
        panels = query_panels(maps, 0, query_index, input_size, image_size)
        np.testing.assert_allclose(panels.prior, G[0, :, query_index].view(nhead, cells_h, cells_w).numpy(),
                                   rtol=0, atol=0)
        np.testing.assert_allclose(panels.attention,
                                   attention[:, query_index].view(nhead, cells_h, cells_w).detach().numpy(),
                                   rtol=1e-4, atol=1e-5)
        # head/query mixtures: the first 2 heads of the last 5 queries carry the prior; G is 0 elsewhere
        expected_mask = np.array([query_index >= 5] * 2 + [False] * 2)
        np.testing.assert_array_equal(panels.has_prior, expected_mask)
        assert not panels.prior[~expected_mask].any()
        # the '+' of each head sits on the peak of its prior: the cell holding the centre (when inside the grid)
        for m in np.flatnonzero(expected_mask):
            cx, cy = panels.centres[m] * np.array([input_size[1] / image_size[1], input_size[0] / image_size[0]])
            col, row = int(cx // 32), int(cy // 32)
            if 0 <= col < cells_w and 0 <= row < cells_h:
                assert np.unravel_index(panels.prior[m].argmax(), panels.prior[m].shape) == (row, col)
    torch.testing.assert_close(outputs["pred_logits"], model(samples)["pred_logits"])


def test_plain_detr_figure_has_no_prior_and_is_drawn(tmp_path, tiny_checkpoint, capsys):
    """A DETR checkpoint (no spatial prior): attention rows only."""
    checkpoint = torch.load(tiny_checkpoint[0], map_location="cpu", weights_only=True)
    config = {**checkpoint["config"], "dynamic_scale": "none", "head_mixture": False, "query_mixture": False,
              "cls_loss": "ce"}
    torch.manual_seed(0)
    model = build_detr(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                       num_queries=10, num_classes=5, backbone_norm=config["backbone_norm"])
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "detr.pth")
    image = Image.new("RGB", (80, 64), (128, 128, 128))
    image.paste((220, 40, 40), (10, 10, 40, 40))
    image.save(tmp_path / "square.png")
    detector = load_detector(str(tmp_path / "detr.pth"))
    _, maps = co_attention_maps(detector.model, nested_tensor_from_tensor_list([detector.transform(image)]))
    assert maps.prior is None and maps.centres is None and maps.attention.shape[:3] == (1, 4, 10)
    torch.testing.assert_close(maps.attention.sum((-1, -2)), torch.ones(1, 4, 10))
    assert predict.cli([str(a) for a in ("--resume", tmp_path / "detr.pth", tmp_path / "square.png", "--output_dir",
                                         tmp_path / "out", "--threshold", "0", "--attention", "--attention_top", "1")]) == 0
    with Image.open(tmp_path / "out" / "square_attention.png") as figure:
        figure.load()
    # without --threshold: DETR's 0.7 for a softmax classifier (0.3 for a focal one, see the next test)
    capsys.readouterr()
    assert predict.cli([str(tmp_path / "square.png"), "--resume", str(tmp_path / "detr.pth"), "--output_dir",
                        str(tmp_path / "default")]) == 0
    assert "--threshold 0.7 (the default for a ce classifier)" in capsys.readouterr().out
    assert all(r["score"] >= 0.7 for r in json.loads((tmp_path / "default" / "detections.json").read_text()))
    assert json.loads((tmp_path / "out" / "detections.json").read_text())[0]["category_name"] in (
        "square", "circle", "triangle", "diamond")


def test_bad_input_is_one_line(tmp_path, tiny_checkpoint, capsys):
    """Through predict.cli in this process (the same code as the script; a traceback would fail the test)."""
    checkpoint = tiny_checkpoint[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a_good.jpg")  # sorted before the broken one
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    cases = [
        (["--resume", checkpoint, tmp_path / "empty", "--output_dir", tmp_path / "o1"], "no images found in"),
        (["--resume", checkpoint, tmp_path / "nothing.jpg", "--output_dir", tmp_path / "o2"], "does not exist"),
        (["--resume", tmp_path / "notes.pth", tmp_path / "images", "--output_dir", tmp_path / "o3"],
         "could not load checkpoint"),
        (["--resume", checkpoint, tmp_path / "images", "--output_dir", tmp_path / "o4", "--threshold", "0"],
         f"cannot read image {tmp_path / 'images' / 'broken.jpg'}"),
        (["--resume", checkpoint, tmp_path / "images", "--output_dir", tmp_path / "images"], "is also an input folder"),
        (["--resume", checkpoint, tmp_path / "images", "--output_dir", tmp_path / "o6", "--threshold", "1.5"],
         "--threshold must be in [0, 1]"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert predict.cli([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    # the image before the broken one was done and kept
    kept = json.loads((tmp_path / "o4" / "detections.json").read_text())
    assert kept and {r["file_name"] for r in kept} == {"a_good.jpg"}
    assert predict.cli([str(a) for a in ("--resume", checkpoint, tmp_path / "images", "--output_dir", tmp_path / "o5",
                                         "--skip_bad_images", "--threshold", "0")]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "1 unreadable images skipped" in captured.out
    assert predict.cli([str(a) for a in ("--resume", checkpoint, tmp_path / "images" / "a_good.jpg", "--output_dir",
                                         tmp_path / "o7")]) == 0
    assert "--threshold 0.3 (the default for a focal classifier)" in capsys.readouterr().out
    assert all(r["score"] >= 0.3 for r in json.loads((tmp_path / "o7" / "detections.json").read_text()))
    assert {r["file_name"] for r in json.loads((tmp_path / "o5" / "detections.json").read_text())} == {"a_good.jpg"}


@pytest.mark.quick
def test_image_ids_and_output_names():
    assert predict.image_ids([Path("a/000139.jpg"), Path("b/42.png")]) == [139, 42]
    assert predict.image_ids([Path("a/1.jpg"), Path("b/001.jpg")]) == [1, 2]  # the same number twice
    assert predict.image_ids([Path("cat.jpg"), Path("7.jpg")]) == [1, 2]
    assert predict.output_names([Path("a/x.jpg"), Path("b/x.png"), Path("y.jpg")]) == ["x", "x-2", "y"]


def test_label_tags_do_not_cover_each_other():
    """Two boxes with the same top edge (a duplicate): the better one's tag sits above, the other moves inside."""
    boxes = np.array([[10.0, 40.0, 90.0, 90.0], [12.0, 40.0, 88.0, 95.0], [5.0, 0.0, 50.0, 30.0]])
    tags = layout_tags(boxes, [(60, 12)] * 3, [0.5, 0.9, 0.7], (100, 100))
    assert tags[1] == (12.0, 28.0, 60, 12)  # best score: above its box
    assert tags[0] == (10.0, 40.0, 60, 12)  # inside its top, not over the best one's tag
    assert tags[2] == (5.0, 0.0, 60, 12)  # no room above the image's top edge: inside
    for i in range(3):
        for j in range(i):
            (xi, yi, wi, hi), (xj, yj, wj, hj) = tags[i], tags[j]
            assert xi + wi <= xj or xj + wj <= xi or yi + hi <= yj or yj + hj <= yi


@pytest.mark.quick
def test_panoptic_picture_tints_segments_outlines_them_and_leaves_void_alone():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    segments = np.zeros((40, 60), dtype=np.int64)  # VOID on the left third
    segments[:, 20:40], segments[:, 40:] = 1, 2
    infos = [{"id": 1, "category_id": 7, "isthing": True}, {"id": 2, "category_id": 9, "isthing": False}]
    picture = np.asarray(draw_panoptic(image, segments, infos, ["", ""], opacity=0.5)).astype(int)  # no text
    pixels = np.asarray(image).astype(int)
    assert (picture[:, :19] == pixels[:, :19]).all()  # VOID: the image as it is
    assert (picture[:, [19, 39]] == 255).all()  # outlines between segments
    for k, columns in ((1, slice(20, 39)), (2, slice(40, 60))):
        expected = np.round(0.5 * pixels[:, columns] + 0.5 * np.array(class_colour(k)))
        assert np.abs(picture[:, columns] - expected).max() <= 1, k
    assert picture.shape == (40, 60, 3)


def test_segmentation_checkpoint_draws_its_panoptic_segmentation(tiny_checkpoint, tmp_path):
    """A --masks checkpoint whose every query says 'square' with certainty, square stored as a stuff class: the
    queries merge into one segment over the whole image; predict.py draws it at the image's size, as
    draw_panoptic draws the post-processor's output run directly, and its attention figure too."""
    path, synthetic_root = tiny_checkpoint
    stored = torch.load(path, map_location="cpu", weights_only=True)
    config = {**stored["config"], "masks": True, "dynamic_scale": "none", "head_mixture": False,
              "query_mixture": False, "cls_loss": "ce", "panoptic_threshold": 0.85}
    torch.manual_seed(0)
    model = build_detr(**{**detr_kwargs(config), "freeze_detector": False})
    with torch.no_grad():
        model.detr.class_embed.weight.zero_()
        model.detr.class_embed.bias.fill_(-10.0)
        model.detr.class_embed.bias[1] = 10.0  # square
    torch.save({"model": model.state_dict(), "config": config, "class_names": stored["class_names"],
                "stuff_ids": [1]}, tmp_path / "segm.pth")
    detector = load_detector(str(tmp_path / "segm.pth"))
    assert detector.panoptic is not None and detector.panoptic.stuff_ids == {1}
    image_path = sorted(val_set(synthetic_root).img_folder.glob("*.jpg"))[0]
    assert predict.cli(["--resume", str(tmp_path / "segm.pth"), str(image_path), "--output_dir",
                        str(tmp_path / "out"), "--attention"]) == 0
    assert Image.open(tmp_path / "out" / f"{image_path.stem}_attention.png").size[0] > 0  # hooks on its detector
    image = Image.open(image_path).convert("RGB")
    tensor = detector.transform(image)
    with torch.no_grad():
        outputs = detector.model(nested_tensor_from_tensor_list([tensor]))
    direct = predict.panoptic_segmentation(detector, outputs, tuple(tensor.shape[-2:]), image)
    assert direct["segments_info"] == [{"id": 1, "category_id": 1, "isthing": False,
                                        "area": image.width * image.height}]
    assert (direct["segments"] == 1).all() and direct["segments"].shape == (image.height, image.width)
    drawn = Image.open(tmp_path / "out" / f"{image_path.stem}_panoptic.png")
    assert drawn.size == image.size
    expected = draw_panoptic(image, direct["segments"].numpy(), direct["segments_info"], ["square"])
    assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(expected))
