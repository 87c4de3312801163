"""experiments/benchmark.py: a real tiny run (none vs type2), the round-robin aggregation, and bad input."""
import csv
import json
import statistics
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from experiments import benchmark
from util.errors import UserError

TINY_MODEL = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1",
              "--dec_layers", "1", "--dim_feedforward", "64"]
BATCH, QUERIES, SIZE, ITERS = 2, 10, 64, 2


def _table_rows(text):
    """Markdown table lines split into cells: header first, separator dropped."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]


def test_tiny_run_none_vs_type2(tmp_path, capsys):
    json_path, csv_path = tmp_path / "bench.json", tmp_path / "bench.csv"
    rc = benchmark.cli(["--variants", "none", "type2", "--queries", str(QUERIES), "--sizes", str(SIZE),
                        "--batch_size", str(BATCH), "--iters", str(ITERS), "--warmup", "1", "--device", "cpu",
                        "--json", str(json_path), "--csv", str(csv_path), "--"] + TINY_MODEL)
    out = capsys.readouterr().out
    assert rc == 0

    rows = {row["variant"]: row for row in json.loads(json_path.read_text())["rows"]}
    assert list(rows) == ["none", "type2"]
    for row in rows.values():
        assert (row["queries"], row["height"], row["width"], row["batch_size"]) == (QUERIES, SIZE, 107, BATCH)
        for kind in ("train", "infer"):
            times = row[f"{kind}_times"]
            assert len(times) == ITERS and all(t > 0 for t in times)
            assert row[f"{kind}_s"] == statistics.median(times)
            assert row[f"{kind}_img_s"] == BATCH / row[f"{kind}_s"]
            assert row[f"{kind}_mem_mib"] > 0
    base, smca = rows["none"], rows["type2"]
    for kind in ("train", "infer"):
        for row in rows.values():
            assert len(row[f"{kind}_cpu_times"]) == ITERS and all(t > 0 for t in row[f"{kind}_cpu_times"])
            assert row[f"{kind}_cpu_s"] == statistics.median(row[f"{kind}_cpu_times"])
        for ratio in ("time", "cpu", "mem"):
            assert base[f"{kind}_{ratio}_ratio"] == 1.0
    assert smca["train_time_ratio"] == pytest.approx(smca["train_s"] / base["train_s"])
    assert smca["infer_mem_ratio"] == pytest.approx(smca["infer_mem_mib"] / base["infer_mem_mib"])

    header, *table = _table_rows(out)
    assert header == benchmark.table_columns("cpu")
    assert {"train time /none", "train cpu /none", "infer mem /none"} <= set(header)
    assert [cells[:3] for cells in table] == [["none", "10", "64x107"], ["type2", "10", "64x107"]]
    ratio_columns = [i for i, name in enumerate(header) if name.endswith("/none")]
    assert len(ratio_columns) == 6 and all(table[0][i] == "1.000" for i in ratio_columns)
    assert table[1][header.index("train ms")] == f"{smca['train_s'] * 1000:.1f}"

    with open(csv_path) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["variant"] for r in csv_rows] == ["none", "type2"]
    assert float(csv_rows[1]["train_img_s"]) == smca["train_img_s"]


def test_round_robin_order_and_medians_over_repeats(monkeypatch):
    """Each repeat starts one variant later; medians and ratios are over all repeats' samples."""
    calls = []

    def fake_measure(kind, args, batch, device, warmup, iters, meter):
        calls.append((kind, args.dynamic_scale, args.head_mixture))
        n = len(calls)
        # times depend on the call index so a median over the wrong samples shows up
        return benchmark.Measurement(times=[0.1 * n, 0.1 * n + 0.05][:iters], cpu_times=[0.01 * n] * iters,
                                     peak_bytes=n * benchmark.MIB)

    monkeypatch.setattr(benchmark, "measure", fake_measure)
    config = benchmark.Config(variants=["none", "type2", "type2+head_mixture"], queries=[5], sizes=[(32, 32)],
                              iters=2, repeats=3, model_flags=TINY_MODEL)
    rows = {row.variant: row for row in benchmark.run(config, log=lambda line: None)}

    order = [(scale, head) for kind, scale, head in calls if kind == "train"]
    none, t2, t2h = ("none", False), ("type2", False), ("type2", True)
    assert order == [none, t2, t2h, t2, t2h, none, t2h, none, t2]
    # reference: every call n gives train times (0.1 n, 0.1 n + 0.05) and memory n MiB; train is call 2k+1
    train_calls = {"none": (1, 11, 15), "type2": (3, 7, 17), "type2+head_mixture": (5, 9, 13)}
    for name, ns in train_calls.items():
        expected = statistics.median([t for n in ns for t in (0.1 * n, 0.1 * n + 0.05)])
        assert rows[name].train_s == expected
        assert rows[name].train_mem_mib == statistics.median(ns)
        assert rows[name].infer_mem_mib == statistics.median([n + 1 for n in ns])
        assert rows[name].train_time_ratio == pytest.approx(expected / rows["none"].train_s)
        assert rows[name].train_cpu_s == statistics.median([0.01 * n for n in ns])


def test_without_baseline_ratios_are_blank(monkeypatch):
    monkeypatch.setattr(benchmark, "measure",
                        lambda *a: benchmark.Measurement(times=[0.5], cpu_times=[0.4], peak_bytes=benchmark.MIB))
    config = benchmark.Config(variants=["type1"], queries=[5], sizes=[(32, 32)], iters=1, model_flags=TINY_MODEL)
    rows = benchmark.run(config, log=lambda line: None)
    assert rows[0].train_time_ratio is None
    env = benchmark.environment(config, "test")
    header, row = _table_rows(benchmark.markdown(rows, env))
    assert row[header.index("train time /none")] == "-" and row[header.index("train cpu /none")] == "-"
    assert not any("cpu" in name for name in benchmark.table_columns("cuda"))
    assert row[header.index("train img/s")] == f"{config.batch_size / 0.5:.3f}"


@pytest.mark.parametrize("spec, shape", [("800", (800, 1333)), ("512", (512, 853)), ("1333", (1333, 1333)),
                                         ("600x900", (600, 900))])
def test_image_shape(spec, shape):
    assert benchmark.image_shape(spec) == shape


@pytest.mark.parametrize("spec", ["abc", "800x", "0", "10x-5"])
def test_image_shape_rejects(spec):
    with pytest.raises(UserError, match="--sizes"):
        benchmark.image_shape(spec)


def test_synthetic_batch_is_fixed_and_valid():
    samples, targets = benchmark.synthetic_batch(3, 40, 60, num_classes=7)
    again, targets_again = benchmark.synthetic_batch(3, 40, 60, num_classes=7)
    assert samples.tensors.shape == (3, 3, 40, 60) and not samples.mask.any()
    assert torch.equal(samples.tensors, again.tensors)
    for t, u in zip(targets, targets_again):
        assert torch.equal(t["boxes"], u["boxes"]) and torch.equal(t["labels"], u["labels"])
        lo, hi = benchmark.BOXES_PER_IMAGE
        assert lo <= len(t["boxes"]) <= hi
        xyxy = torch.cat([t["boxes"][:, :2] - t["boxes"][:, 2:] / 2, t["boxes"][:, :2] + t["boxes"][:, 2:] / 2], 1)
        assert (xyxy >= 0).all() and (xyxy <= 1).all()
        assert ((t["labels"] >= 0) & (t["labels"] < 7)).all()
        assert t["size"].tolist() == [40, 60]


@pytest.mark.parametrize("argv, message", [
    (["--variants", "none", "type9"], "--variants: unknown type9; choose from none type1"),
    (["--variants", "none", "none"], "given twice"),
    (["--sizes", "big"], "--sizes 'big'"),
    (["--variants", "none", "--", "--num_queries", "5"], "--num_queries is set by the benchmark"),
    (["--variants", "none", "--", "--dynamic_scale=type1"], "--dynamic_scale=type1 is set by the benchmark"),
    (["--variants", "none", "--", "--no_such_flag", "1"], "unknown --no_such_flag 1"),
    (["--variants", "none", "--", "--hidden_dim", "x"], "--hidden_dim: invalid int value"),
    (["--variants", "none", "--device", "cpu", "--amp"], "--amp uses bf16 autocast on CUDA"),
    (["--variants", "type2+query_mixture", "--queries", "1"], "--query_mixture needs at least 2 queries"),
])
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert benchmark.cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_invalid_variant_exits_2_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--variants", "bogus"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --variants: unknown bogus; choose from "
                                   + " ".join(benchmark.VARIANTS))


@pytest.mark.parametrize("meter_class", [benchmark.CpuKernelPeakRss, benchmark.CpuSampledRss])
def test_cpu_memory_meters_see_a_freed_peak(meter_class):
    """A 256 MiB buffer touched and freed during the timed window shows up in the peak, not in the baseline."""
    if meter_class is benchmark.CpuKernelPeakRss and not benchmark._can_reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    meter = meter_class()
    meter.start()
    meter.reset_peak()
    buffer = torch.ones(256 * benchmark.MIB // 4)  # float32: 256 MiB, every page written
    time.sleep(20 * benchmark.RSS_SAMPLE_SECONDS)  # the sampling thread gets several looks at it
    del buffer
    peak_mib = meter.peak() / benchmark.MIB
    assert 250 <= peak_mib < 1024
