"""experiments/benchmark_eval.py (python -m experiments.benchmark eval): a real tiny run of both backends."""
import json

import pytest

from experiments import benchmark, benchmark_eval


@pytest.mark.parametrize("postprocess, per_image", [("focal", 10), ("ce", 10)])
@pytest.mark.quick
def test_tiny_run_reports_both_backends_with_the_same_stats(tmp_path, capsys, postprocess, per_image):
    path = tmp_path / "eval.json"
    rc = benchmark.cli(["eval", "--images", "12", "--queries", "10", "--classes", "5", "--objects", "3",
                        "--postprocess", postprocess, "--batch_size", "5", "--repeats", "2", "--json", str(path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads(path.read_text())
    rows = {row["backend"]: row for row in result["rows"]}
    assert list(rows) == ["faster_coco_eval", "pycocotools"]
    for row in rows.values():
        # focal: the top Q of the Q x (C + 1) (query, column) pairs, no-object ones dropped; ce: one per query
        assert row["images"] == 12
        if postprocess == "ce":
            assert row["detections"] == 12 * per_image
        else:
            assert 0 < row["detections"] <= 12 * per_image
        assert len(row["post_times"]) == len(row["scoring_times"]) == 2
        assert row["total_s"] == pytest.approx(row["post_s"] + row["scoring_s"])
        assert row["images_per_s"] == pytest.approx(12 / row["total_s"])
    assert rows["faster_coco_eval"]["stats"] == pytest.approx(rows["pycocotools"]["stats"], abs=1e-12)
    assert 0.2 < rows["pycocotools"]["stats"][0] < 1.0  # the jittered queries match: a real, imperfect AP
    assert result["stats_max_abs_diff"] <= 1e-12
    table = [line for line in out.out.splitlines() if line.startswith("| faster_coco_eval") or
             line.startswith("| pycocotools")]
    assert rows["faster_coco_eval"]["detections"] == rows["pycocotools"]["detections"]
    assert len(table) == 2 and f"{rows['pycocotools']['detections'] / 12:.1f}" in table[0]
    assert "12 COCO stats the same across backends" in out.out
    assert out.err.count("pass ") == 4  # 2 passes x 2 backends, logged to stderr


@pytest.mark.quick
def test_bad_input_is_one_error_line(capsys):
    assert benchmark_eval.cli(["--images", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --images must be positive, got 0"
    assert benchmark.cli(["eval", "--backends", "pycocotools", "pycocotools"]) == 2
    assert "lists a backend twice" in capsys.readouterr().err
