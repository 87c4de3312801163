"""python -m experiments.benchmark infer on a tiny model: one eager and one onnxruntime row per variant, the same
outputs, and the flags' errors in one line."""
import json

import pytest

from experiments import benchmark

pytest.importorskip("onnxruntime", reason="the export extra (requirements-export.txt) is not installed")

TINY_MODEL = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1",
              "--dim_feedforward", "48", "--num_queries", "6"]


def test_infer_mode_measures_both_engines_of_each_variant(tmp_path, capsys):
    out = tmp_path / "infer.json"
    assert benchmark.cli(["infer", "--variants", "none", "type2", "--size", "64x96", "--warmup", "0", "--iters", "1",
                          "--threads", "1", "--json", str(out), "--", *TINY_MODEL]) == 0
    table = capsys.readouterr().out
    assert table.startswith("CPU, 64x96, batch 1, 1 threads")
    result = json.loads(out.read_text())
    assert [(r["variant"], r["engine"]) for r in result["rows"]] == [
        ("none", "eager"), ("none", "onnxruntime"), ("type2", "eager"), ("type2", "onnxruntime")]
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and row["peak_mib"] > 0 and len(row["times"]) == 1
        assert row["max_abs_diff"] <= 1e-4
        assert f"| {row['variant']} | {row['engine']} |" in table


@pytest.mark.quick
@pytest.mark.parametrize("argv, message", [
    (["--variants", "type9"], "--variants: unknown type9"),
    (["--iters", "0"], "--iters must be positive, got 0"),
    (["--", "--no_such_flag"], "model flags after --: unknown --no_such_flag"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    assert benchmark.cli(["infer", "--size", "64x96", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
