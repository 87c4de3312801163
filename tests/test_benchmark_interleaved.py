"""The model mode of experiments/benchmark.py: paired ratios with bootstrap intervals against a plain computation,
the 'not resolved' flag, the interleaved order, and a real tiny run end to end (DETR and type2, default and
channels_last)."""
import json

import numpy as np
import pytest

from experiments import benchmark, benchmark_common, benchmark_model, benchmark_rounds
from tests import md_tables

TINY_MODEL = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1",
              "--dec_layers", "1", "--dim_feedforward", "64"]


def _plain_bootstrap(values, baseline, resamples, seed):
    """The reference: per-round ratios, their median, and the 2.5/97.5 percentiles of resampled medians drawn
    with the same generator calls, one resample at a time."""
    ratios = [v / b for v, b in zip(values, baseline)]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ratios), size=(resamples, len(ratios)))
    medians = sorted(float(np.median([ratios[i] for i in row])) for row in picks)
    return float(np.median(ratios)), float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


@pytest.mark.quick
def test_paired_ratio_matches_a_plain_bootstrap():
    baseline = [1.0, 2.0, 1.5, 1.2, 3.0, 1.1, 1.3, 2.2, 1.8, 1.6, 1.4, 2.5]
    values = [b * r for b, r in zip(baseline, [1.01, 1.02, 0.99, 1.00, 1.03, 1.01, 1.00, 1.02, 0.98, 1.01, 1.00, 1.02])]
    result = benchmark_rounds.paired_ratio(values, baseline, resamples=500, seed=3)
    median, low, high = _plain_bootstrap(values, baseline, 500, 3)
    assert result.median == pytest.approx(median, abs=1e-12) and median == pytest.approx(1.01)
    assert (result.low, result.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert 0.99 <= result.low <= 1.01 <= result.high <= 1.02
    assert result.resolved and result.format() == f"{median:.3f} [{low:.3f}, {high:.3f}]"
    # a slow spell that hits both variants of a round cancels in the paired ratio
    drift = [b * 10 for b in baseline[:6]] + baseline[6:]
    drifted = [v * 10 for v in values[:6]] + values[6:]
    assert benchmark_rounds.paired_ratio(drifted, drift, resamples=500, seed=3) == result


@pytest.mark.quick
def test_wide_interval_is_not_resolved():
    baseline = [1.0] * 10
    values = [0.9, 1.1, 0.95, 1.05, 0.85, 1.15, 1.0, 0.92, 1.08, 1.0]
    result = benchmark_rounds.paired_ratio(values, baseline)
    _, low, high = _plain_bootstrap(values, baseline, benchmark_rounds.BOOTSTRAP_RESAMPLES,
                                    benchmark_rounds.BOOTSTRAP_SEED)
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high))
    assert high > result.median * 1.03 or low < result.median * 0.97
    assert not result.resolved and result.format().endswith(" not resolved")
    # constant ratios: a zero-width interval
    steady = benchmark_rounds.paired_ratio([2.0] * 10, [1.0] * 10)
    assert (steady.median, steady.low, steady.high, steady.resolved) == (2.0, 2.0, 2.0, True)
    with pytest.raises(ValueError):
        benchmark_rounds.paired_ratio([1.0], [1.0, 2.0])


def test_interleave_alternates_one_step_per_round():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    timings = benchmark_rounds.interleave(steps, benchmark_common.torch.device("cpu"), warmup=1, samples=4)
    # warmup round (-1) starts at C: the rotation is by round index, the timed rounds start at A
    assert calls == list("CAB" "ABC" "BCA" "CAB" "ABC")
    assert all(len(t.times) == len(t.cpu_times) == 4 and min(t.times) >= 0 for t in timings.values())
    assert benchmark_rounds.check_samples(9) and not benchmark_rounds.check_samples(10)
    assert benchmark_rounds.load_average().startswith("1, 5, 15 min: ")


def test_tiny_interleaved_run_end_to_end(tmp_path, capsys):
    """DETR and type2 (fused), default and channels_last, 10 rounds: every ratio is the paired bootstrap of the
    recorded per-round times, /none and /default divide by the right cells, memory once per cell."""
    json_path, csv_path = tmp_path / "bench.json", tmp_path / "bench.csv"
    rc = benchmark.cli(["model", "--variants", "none", "type2", "--routes", "fused", "--accels", "default",
                        "channels_last", "--queries", "10", "--sizes", "64x96", "--warmup", "1", "--samples", "10",
                        "--device", "cpu", "--json", str(json_path), "--csv", str(csv_path), "--"] + TINY_MODEL)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "load average at start: 1, 5, 15 min: " in captured.err
    data = json.loads(json_path.read_text())
    assert data["environment"]["load_start"].startswith("1, 5, 15 min: ") and data["environment"]["load_end"]
    rows = {(r["variant"], r["route"], r["accel"]): r for r in data["rows"]}
    assert list(rows) == [("none", "-", "default"), ("type2", "fused", "default"),
                          ("none", "-", "channels_last"), ("type2", "fused", "channels_last")]
    for (variant, route, accel), row in rows.items():
        base, same = rows["none", "-", accel], rows[variant, route, "default"]
        for kind in ("train", "infer"):
            assert len(row["times"][kind]) == len(row["times"][f"{kind}_cpu"]) == 10
            assert row["seconds"][kind] == float(np.median(row["times"][kind]))
            assert row["mem_mib"][kind] > 0
            for measure, key in (("time", kind), ("cpu", f"{kind}_cpu")):
                for attr, other in (("vs_none", base), ("vs_default", same)):
                    median, low, high = _plain_bootstrap(row["times"][key], other["times"][key],
                                                         benchmark_rounds.BOOTSTRAP_RESAMPLES,
                                                         benchmark_rounds.BOOTSTRAP_SEED)
                    got = row[attr][f"{kind}_{measure}"]
                    assert (got["median"], got["low"], got["high"]) == (
                        pytest.approx(median), pytest.approx(low), pytest.approx(high))
            assert row["mem_vs_none"][kind] == pytest.approx(row["mem_mib"][kind] / base["mem_mib"][kind])
    assert rows["none", "-", "default"]["vs_none"]["train_time"]["median"] == 1.0
    header = [line for line in captured.out.splitlines() if line.startswith("| variant")][0]
    assert md_tables.cells(header) == benchmark_model.table_columns(["train", "infer"])
    assert "load average at start" in captured.out and "at end" in captured.out
    assert csv_path.read_text().splitlines()[0].split(",")[:5] == ["variant", "route", "accel", "queries", "image"]


def test_interleaved_order_over_cells(monkeypatch):
    """run() builds every cell once and hands one step per (cell, kind) to interleave, in cell order."""
    seen = {}

    def fake_interleave(steps, device, warmup, samples, log=None):
        seen["names"] = list(steps)
        return {name: benchmark_common.Timing([1.0 + i] * samples, [0.5] * samples) for i, name in enumerate(steps)}

    monkeypatch.setattr(benchmark_model, "interleave", fake_interleave)
    monkeypatch.setattr(benchmark_model, "memory_step", lambda *a: 2 * benchmark_common.MIB)
    config = benchmark_model.Config(variants=["none", "type1"], routes=["fused"], queries=[5], sizes=[(32, 32)],
                                    steps=["train"], model_flags=TINY_MODEL)
    rows = benchmark_model.run(config, log=lambda line: None)
    assert seen["names"] == ["none (-, default) train", "type1 (fused, default) train"]
    assert rows[1].vs_none["train_time"].median == 2.0 and rows[1].vs_none["train_time"].resolved
    assert rows[1].mem_vs_none["train"] == 1.0 and rows[1].vs_default["train_cpu"].median == 1.0
    # the compile accels resolve with inductor on one canvas (main.py refuses inductor training without one)
    both = benchmark_model.variant_args(config, "type1", 5, "fused", "both")
    assert (both.compile, both.channels_last, both.fixed_size) == ("inductor", True, (32, 32))


@pytest.mark.parametrize("argv, message", [
    (["--accels", "turbo"], "--accels: unknown turbo"),
    (["--samples", "5"], "--samples 5: at least 10 paired samples"),
    (["--compile_backend", "tvm"], "--compile_backend tvm"),
    (["--steps", "train", "train"], "--steps: a name is given twice"),
    (["--variants", "none", "--", "--channels_last"], "--channels_last is set by the benchmark"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    assert benchmark.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
