"""PQ / SQ / RQ as panopticapi's pq_compute defines them, on hand-computed cases: a perfect match, a missed segment,
a false positive, crowd regions, VOID pixels, stuff classes, the IoU > 0.5 boundary; and the evaluator on real PNG
files with pq_compute's printed table."""
import json

import numpy as np
import pytest
from PIL import Image

from datasets.coco_panoptic import id2rgb, rgb2id
from datasets.panoptic_eval import PanopticEvaluator, image_pq_stats, pq_average

CATEGORIES = {1: {"id": 1, "isthing": 1}, 2: {"id": 2, "isthing": 1}, 5: {"id": 5, "isthing": 0},
              6: {"id": 6, "isthing": 0}}


def segments(ids: np.ndarray, categories: dict, crowd=()) -> list:
    """segments_info for the ids of a map (areas from its pixels, as the JSON of COCO panoptic holds them)."""
    return [{"id": i, "category_id": c, "iscrowd": int(i in crowd), "area": int((ids == i).sum())}
            for i, c in categories.items()]


def scene():
    """10 x 10: stuff 'wall' (cat 5, id 50) with a 4 x 4 thing (cat 1, id 11) in the top-left corner."""
    gt = np.full((10, 10), 50)
    gt[:4, :4] = 11
    return gt, {11: 1, 50: 5}


def summary(stats):
    return {name: pq_average(stats, CATEGORIES, isthing)[0] for name, isthing in
            (("All", None), ("Things", True), ("Stuff", False))}


def test_perfect_match():
    gt, cats = scene()
    pred = np.where(gt == 11, 3, 7)  # other ids, same segments
    stats = image_pq_stats(gt, segments(gt, cats), pred, segments(pred, {3: 1, 7: 5}))
    assert stats == {1: [1.0, 1, 0, 0], 5: [1.0, 1, 0, 0]}
    result = summary(stats)
    assert result["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert result["Things"]["n"] == 1 and result["Stuff"]["n"] == 1


def test_one_missed_segment():
    gt, cats = scene()
    gt[6:9, 6:9] = 22  # a second thing, category 2, 9 pixels
    cats = {**cats, 22: 2}
    pred = np.where(gt == 11, 3, 7)  # the cat-2 thing is predicted as wall
    stats = image_pq_stats(gt, segments(gt, cats), pred, segments(pred, {3: 1, 7: 5}))
    # wall: prediction 84 px, ground truth 75 px, intersection 75 -> IoU 75 / 84
    assert stats[1] == [1.0, 1, 0, 0] and stats[2] == [0.0, 0, 0, 1]
    assert stats[5][1:] == [1, 0, 0] and stats[5][0] == pytest.approx(75 / 84)
    result = summary(stats)
    # category 2: PQ = 0 / (0 + 0.5), SQ = 0 (no TP), RQ = 0
    assert result["Things"] == pytest.approx({"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2})
    assert result["All"] == pytest.approx({"pq": (1 + 0 + 75 / 84) / 3, "sq": (1 + 0 + 75 / 84) / 3,
                                           "rq": (1 + 0 + 1) / 3, "n": 3})


def test_one_false_positive():
    gt, cats = scene()
    pred = np.where(gt == 11, 3, 7)
    pred[6:8, 6:8] = 9  # a 4-pixel cat-2 segment cut out of the wall
    stats = image_pq_stats(gt, segments(gt, cats), pred, segments(pred, {3: 1, 7: 5, 9: 2}))
    assert stats[2] == [0.0, 0, 1, 0]
    assert stats[5][0] == pytest.approx(80 / 84)  # prediction 80 px inside the 84 px wall
    result = summary(stats)
    # category 2: PQ = 0 / (0 + 0.5 * 1)
    assert result["All"] == pytest.approx({"pq": (1 + 0 + 80 / 84) / 3, "sq": (1 + 0 + 80 / 84) / 3,
                                           "rq": (1 + 0 + 1) / 3, "n": 3})


def test_iou_must_exceed_one_half():
    gt, cats = scene()
    pred = np.where(gt == 11, 3, 7)
    pred[:4, 2:4] = 7  # the thing predicted on 8 of its 16 pixels: IoU exactly 0.5 -> no match
    stats = image_pq_stats(gt, segments(gt, cats), pred, segments(pred, {3: 1, 7: 5}))
    assert stats[1] == [0.0, 0, 1, 1]
    pred[0, 2] = 3  # one more pixel: IoU 9 / 16
    stats = image_pq_stats(gt, segments(gt, cats), pred, segments(pred, {3: 1, 7: 5}))
    assert stats[1][1:] == [1, 0, 0] and stats[1][0] == pytest.approx(9 / 16)


@pytest.mark.quick
def test_crowd_region_is_neither_missed_nor_a_false_positive_of_its_category():
    gt, cats = scene()
    gt[5:10, 5:10] = 12  # a crowd of cat 1 (25 px)
    cats = {**cats, 12: 1}
    gt_segments = segments(gt, cats, crowd={12})
    pred = np.where(gt == 11, 3, 7)
    pred[5:9, 5:9] = 4  # cat-1 prediction with 16 of 16 px on the crowd: ignored
    pred[0:2, 8:10] = 5  # cat-1 prediction on the wall: a false positive
    stats = image_pq_stats(gt, gt_segments, pred, segments(pred, {3: 1, 4: 1, 5: 1, 7: 5}))
    assert stats[1] == [1.0, 1, 1, 0]  # the crowd adds no FN, its covering prediction no FP
    # a prediction of another category on the crowd is a false positive (crowd regions ignore their category only)
    stats = image_pq_stats(gt, gt_segments, pred, segments(pred, {3: 1, 4: 2, 5: 1, 7: 5}))
    assert stats[2] == [0.0, 0, 1, 0]
    # a crowd segment never matches, even when predicted exactly
    exact = np.where(gt == 11, 3, np.where(gt == 12, 4, 7))
    stats = image_pq_stats(gt, gt_segments, exact, segments(exact, {3: 1, 4: 1, 7: 5}))
    assert stats[1] == [1.0, 1, 0, 0]


def test_void_pixels_leave_the_union_and_hide_false_positives():
    gt, cats = scene()
    gt[4:6, :] = 0  # VOID band below the thing (20 px)
    gt_segments = segments(gt, cats)
    pred = np.where(gt == 11, 3, 7)
    pred[4:6, :4] = 3  # the thing predicted with 8 extra px, all on VOID
    pred[4:6, 6:10] = 8  # a cat-2 segment entirely on VOID: not a false positive
    stats = image_pq_stats(gt, gt_segments, pred, segments(pred, {3: 1, 7: 5, 8: 2}))
    # IoU = 16 / (24 + 16 - 16 - 8) = 1: the VOID part of the prediction is not in the union
    assert stats[1] == [1.0, 1, 0, 0]
    assert 2 not in stats
    # wall: prediction 64 + 4 px VOID (cols 4-5 of the band), ground truth 64 -> IoU 64 / (68 + 64 - 64 - 4) = 1
    assert stats[5] == [1.0, 1, 0, 0]
    # half or less on VOID is a false positive: 4 of 8 px
    pred[3, 6:10] = 8
    pred[4, 6:10] = 7
    stats = image_pq_stats(gt, gt_segments, pred, segments(pred, {3: 1, 7: 5, 8: 2}))
    assert stats[2] == [0.0, 0, 1, 0]


def test_stuff_and_thing_averages_use_the_ground_truth_categories():
    gt, cats = scene()
    gt[7:, :] = 60  # a second stuff region (cat 6, 30 px)
    cats = {**cats, 60: 6}
    pred = np.where(gt == 11, 3, 7)  # the floor predicted as wall
    stats = image_pq_stats(gt, segments(gt, cats), pred, segments(pred, {3: 1, 7: 5}))
    # wall: prediction 84 px, ground truth 54 px, IoU 54 / 84 > 0.5; floor missed
    assert stats[6] == [0.0, 0, 0, 1]
    result = summary(stats)
    assert result["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert result["Stuff"] == pytest.approx({"pq": (54 / 84) / 2, "sq": (54 / 84) / 2, "rq": 0.5, "n": 2})
    # categories without TP, FP or FN do not count; none at all gives 0 (pq_compute divides by zero)
    assert pq_average({}, CATEGORIES, None)[0] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


@pytest.mark.quick
def test_ground_truth_area_comes_from_the_json():
    """pq_compute takes a ground-truth segment's area from the JSON, not from the PNG."""
    gt, cats = scene()
    gt_segments = segments(gt, cats)
    gt_segments[0]["area"] = 20  # the thing's JSON area says 20 (PNG: 16)
    pred = np.where(gt == 11, 3, 7)
    stats = image_pq_stats(gt, gt_segments, pred, segments(pred, {3: 1, 7: 5}))
    assert stats[1][0] == pytest.approx(16 / 20)


def test_inconsistent_predictions_are_refused():
    gt, cats = scene()
    pred = np.where(gt == 11, 3, 7)
    with pytest.raises(ValueError, match="not in segments_info"):
        image_pq_stats(gt, segments(gt, cats), pred, [{"id": 3, "category_id": 1}])
    with pytest.raises(ValueError, match="not in the map"):
        image_pq_stats(gt, segments(gt, cats), pred, segments(pred, {3: 1, 7: 5}) + [{"id": 9, "category_id": 2}])


def test_rgb_ids_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536, 256 ** 3 - 1]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb[1, 0].tolist() == [0, 1, 0] and rgb[1, 1].tolist() == [0, 0, 1]
    assert np.array_equal(rgb2id(rgb), ids)


def test_evaluator_on_png_files_prints_pq_computes_table(tmp_path, capsys):
    """Two images as COCO panoptic files on disk; the summary is the sum over images, then the class average."""
    gt1, cats1 = scene()
    gt2, _ = scene()
    gt2[6:9, 6:9] = 22
    cats2 = {11: 1, 50: 5, 22: 2}
    folder = tmp_path / "panoptic_val2017"
    folder.mkdir()
    annotations = []
    for image_id, (gt, cats) in enumerate([(gt1, cats1), (gt2, cats2)], start=1):
        Image.fromarray(id2rgb(gt)).save(folder / f"{image_id:012d}.png")
        annotations.append({"image_id": image_id, "file_name": f"{image_id:012d}.png",
                            "segments_info": segments(gt, cats)})
    categories = [{"id": c, "name": str(c), "isthing": v["isthing"]} for c, v in CATEGORIES.items()]
    panoptic = json.loads(json.dumps({"images": [], "annotations": annotations, "categories": categories}))
    evaluator = PanopticEvaluator(panoptic, folder)
    perfect = np.where(gt1 == 11, 1, 2)
    evaluator.update({1: {"segments": perfect, "segments_info": segments(perfect, {1: 1, 2: 5})},
                      2: {"segments": perfect, "segments_info": segments(perfect, {1: 1, 2: 5})}})
    results = evaluator.summarize()
    # cat 1: 2 TP (IoU 1); cat 2: 1 FN; cat 5: IoU 1 and 75 / 84
    expected_wall = (1 + 75 / 84) / 2
    assert results["All"] == pytest.approx({"pq": (1 + 0 + expected_wall) / 3, "sq": (1 + 0 + expected_wall) / 3,
                                            "rq": 2 / 3, "n": 3})
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines.index("{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"))
    assert lines[header + 1] == "-" * 38
    assert lines[header + 2] == "{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
        "All", 100 * results["All"]["pq"], 100 * results["All"]["sq"], 100 * results["All"]["rq"], 3)
    assert lines[header + 3].startswith("Things    |") and lines[header + 4].startswith("Stuff     |")
    # an image scored twice (DistributedSampler padding) replaces its first result
    evaluator.update({2: {"segments": perfect, "segments_info": segments(perfect, {1: 1, 2: 5})}})
    assert len(evaluator.image_stats) == 2
