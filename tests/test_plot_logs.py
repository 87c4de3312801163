"""experiments/plot_logs.py and compare.py --plot loss on DETR-style log.txt files written here (DETR's keys)."""
import json
import os

import pytest
from PIL import Image

from experiments import plot_logs
from tests.cli import run_script
from util.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two cycle colours


def detr_record(epoch, scale):
    """One line of a DETR log.txt (the keys of facebookresearch/detr's published logs), values from ``scale``."""
    record = {"epoch": epoch, "n_parameters": 41302368, "train_lr": 1e-4, "train_class_error": 50.0 / (epoch + 1)}
    for split, offset in (("train", 0.0), ("test", 0.3)):
        parts = {"loss_ce": 1.0 * scale / (epoch + 1) + offset, "loss_bbox": 0.5 * scale / (epoch + 1),
                 "loss_giou": 0.8 * scale / (epoch + 1)}
        record[f"{split}_loss"] = sum(parts.values())
        for name, value in parts.items():
            record[f"{split}_{name}"] = value
            record[f"{split}_{name}_unscaled"] = value / 2
            for layer in range(5):
                record[f"{split}_{name}_{layer}"] = value * 1.1
        record[f"{split}_cardinality_error_unscaled"] = 3.0
    record["test_class_error"] = 60.0 / (epoch + 1)
    record["test_coco_eval_bbox"] = [0.1 * scale * (epoch + 1), 0.2 * (epoch + 1)] + [0.05] * 9 + [-1.0]
    return record


def write_log(path, records, torn_tail=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if torn_tail:
        text += '{"epoch": 9, "train_lo'
    path.write_text(text)


@pytest.fixture
def logs(tmp_path):
    root = tmp_path / "detr_logs"
    write_log(root / "r50" / "log.txt", [detr_record(e, 1.0) for e in range(4)])
    write_log(root / "r101" / "log.txt", [detr_record(e, 2.0) for e in range(3)], torn_tail=True)
    return root


def run(script, *args):
    return run_script(f"experiments.{script.removesuffix('.py')}", args)


def pixels_near(path, rgb, tolerance=10):
    with Image.open(path) as image:
        assert image.width > 600 and image.height > 300
        return sum(n for n, c in image.convert("RGB").getcolors(maxcolors=1 << 20)
                   if all(abs(a - b) <= tolerance for a, b in zip(c, rgb)))


def test_curves_read_from_a_detr_log(logs):
    records = plot_logs.read_log(str(logs / "r101" / "log.txt"))
    assert [r["epoch"] for r in records] == [0, 1, 2]  # the torn last line is skipped
    curves = plot_logs.field_curves(records, "loss_bbox")
    assert curves["train"] == ([1, 2, 3], pytest.approx([1.0, 0.5, 1.0 / 3]))
    assert curves["test"][1] == pytest.approx(curves["train"][1])
    ap = plot_logs.field_curves(records, "mAP")
    assert list(ap) == ["test"] and ap["test"] == ([1, 2, 3], pytest.approx([0.2, 0.4, 0.6]))
    assert plot_logs.field_curves(records, "ARl") == {}  # -1: no objects of that size, not a point
    by_images = plot_logs.field_curves(records, "class_error", x="images", images_per_epoch=1000)
    assert by_images["train"][0] == [1000, 2000, 3000] and by_images["test"][1] == pytest.approx([60, 30, 20])
    with pytest.raises(UserError, match="has no 'images_seen'.*--images_per_epoch"):
        plot_logs.field_curves(records, "loss", x="images", source="r101/log.txt")


@pytest.mark.quick
def test_aggregate_mean_band_over_common_epochs():
    curves = [([1, 2, 3], [1.0, 2.0, 3.0]), ([1, 2, 3, 4], [3.0, 4.0, 8.0, 9.0]), ([1, 2, 3], [2.0, 6.0, 4.0])]
    xs, mean, low, high = plot_logs.aggregate(curves, "minmax")
    assert xs == [1, 2, 3] and mean == pytest.approx([2.0, 4.0, 5.0])
    assert low == [1.0, 2.0, 3.0] and high == [3.0, 6.0, 8.0]
    _, _, low, high = plot_logs.aggregate(curves, "std")
    # sample std of (1, 3, 2) is 1, of (2, 4, 6) is 2, of (3, 8, 4) is sqrt(7)
    assert low == pytest.approx([1.0, 2.0, 5.0 - 7 ** 0.5]) and high == pytest.approx([3.0, 6.0, 5.0 + 7 ** 0.5])
    assert plot_logs.aggregate(curves[:1], "std")[2:] == ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])


def test_plot_logs_cli_writes_a_png_with_every_run(logs, tmp_path):
    out = tmp_path / "logs.png"
    result = run("plot_logs.py", str(logs), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out} (2 runs: r101, r50)"
    assert pixels_near(out, C0) > 200 and pixels_near(out, C1) > 200  # both runs drawn

    one = tmp_path / "one.png"
    result = run("plot_logs.py", str(logs / "r50" / "log.txt"), "--fields", "loss_ce_unscaled", "AP50",
                 "--x", "images", "--images_per_epoch", "118287", "--out", str(one))
    assert result.returncode == 0, result.stderr
    assert pixels_near(one, C0) > 100 and pixels_near(one, C1) < 20


@pytest.mark.parametrize("args, message", [
    (["--fields", "loss_mask"], "error: field 'loss_mask': no log has train_loss_mask, test_loss_mask"),
    (["--x", "images"], "has no 'images_seen' (DETR's logs do not); pass --images_per_epoch N"),
    (["--images_per_epoch", "0"], "error: --images_per_epoch must be positive, got 0"),
])
def test_bad_input_is_one_error_line(logs, tmp_path, args, message):
    result = run("plot_logs.py", str(logs), "--out", str(tmp_path / "x.png"), *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.quick
def test_a_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "run" / "log.txt"
    write_log(path, [detr_record(0, 1.0)])
    path.write_text(path.read_text() + "not json\n" + json.dumps(detr_record(1, 1.0)) + "\n")
    with pytest.raises(UserError, match=r"log.txt:2: not a JSON object"):
        plot_logs.read_log(str(path))


def test_compare_plot_loss_groups_seeds(tmp_path):
    """compare.py --plot loss: the log.txt curves of a sweep, the seeds of a run as one mean curve with a band."""
    from tests.test_compare import BASE_CONFIG, write_run

    root = tmp_path / "sweep"
    for name, seed, scale in (("a/seed0", 0, 1.0), ("a/seed1", 1, 1.5), ("b", 0, 3.0)):
        flags = {"dynamic_scale": "type2"} if name == "b" else {}
        write_run(str(root / name), {**BASE_CONFIG, **flags, "seed": seed}, [0.1, 0.2], [1.0, 1.0])
        records = [{**detr_record(e, scale), "images_seen": 64 * (e + 1)} for e in range(2)]
        write_log(root / name / "log.txt", records)
    result = run("compare.py", str(root), "--plot", "metric", "loss", "--x", "images")
    assert result.returncode == 0, result.stderr
    assert f"wrote {root / 'compare.csv'} and {root / 'compare_groups.csv'} and {root / 'compare_AP.png'} " \
           f"and {root / 'compare_loss.png'}" in result.stdout
    band = tuple(round(255 + 0.2 * (c - 255)) for c in C0)  # group a's band: C0 at alpha 0.2 on white
    assert pixels_near(root / "compare_loss.png", band, 4) > 5000
    assert pixels_near(root / "compare_loss.png", C1) > 200  # run b

    (root / "b" / "log.txt").unlink()
    for seed in ("seed0", "seed1"):
        (root / "a" / seed / "log.txt").unlink()
    result = run("compare.py", str(root), "--plot", "loss")
    assert result.returncode == 2 and "--plot loss: none of the runs has a log.txt yet" in result.stderr


def test_a_downloaded_log_is_named_after_its_file(tmp_path):
    write_log(tmp_path / "detr-r50_log.txt", [detr_record(0, 1.0)])
    write_log(tmp_path / "runs" / "r101" / "log.txt", [detr_record(0, 2.0)])
    found = plot_logs.find_logs([str(tmp_path / "detr-r50_log.txt"), str(tmp_path / "runs" / "r101" / "log.txt")])
    assert [label for label, _ in found] == ["detr-r50_log", "r101"]
