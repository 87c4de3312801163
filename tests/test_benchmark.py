"""experiments/benchmark*.py: real tiny runs of the coattn mode (one co-attention with and without the prior), the
dispatch, the shared helpers, and bad input (the model mode's runs: tests/test_benchmark_interleaved.py)."""
import json
import time

import pytest
import torch

from experiments import benchmark, benchmark_coattn, benchmark_common, benchmark_model, benchmark_steps
from tests import md_tables
from tests.cli import run_script
from util.errors import UserError

TINY_MODEL = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1",
              "--dec_layers", "1", "--dim_feedforward", "64"]
BATCH, QUERIES, SIZE, ITERS = 2, 10, 64, 2


def test_coattn_mode_prior_share_and_saved_memory(tmp_path, capsys):
    """A real tiny co-attention run. What autograd keeps for the backward is exact: the fused route adds less
    than one (B, nhead, Q, HW) float32 tensor to DETR's (its extra q/k dims and the prior's small tensors). The
    explicit route's G and its gradient are transient (peak memory, too noisy on CPU at this size to assert)."""
    batch, heads, queries, size, stride = 2, 2, 100, "512x640", 32
    json_path = tmp_path / "coattn.json"
    rc = benchmark.cli(["coattn", "--variants", "none", "type4", "type2+both", "--queries", str(queries),
                        "--sizes", size, "--stride", str(stride), "--batch_size", str(batch), "--hidden_dim", "64",
                        "--nheads", str(heads), "--iters", "2", "--warmup", "0", "--device", "cpu",
                        "--json", str(json_path)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {(r["variant"], r["route"]): r for r in json.loads(json_path.read_text())["rows"]}
    assert list(rows) == [("none", "-"), ("type4", "fused"), ("type4", "explicit"), ("type2+both", "fused"),
                          ("type2+both", "explicit")]
    grid = (16, 20)
    one_logit_tensor = batch * heads * queries * grid[0] * grid[1] * 4 / benchmark_common.MIB
    base = rows["none", "-"]
    assert base["prior"] == "-" and base["time_ratio"] == base["saved_ratio"] == 1.0
    for (variant, route), row in rows.items():
        assert (row["grid_h"], row["grid_w"]) == grid and len(row["times"]) == 2 and row["ms"] > 0
        assert row["saved_ratio"] == pytest.approx(row["saved_mib"] / base["saved_mib"])
        if route == "explicit":
            assert row["prior"] == "G" and row["saved_mib"] > base["saved_mib"]
        elif route == "fused":
            assert row["prior"] == "factors" and 0 < row["saved_mib"] - base["saved_mib"] < one_logit_tensor
    header, *table = md_tables.rows(out)
    assert header == benchmark_coattn.COLUMNS
    assert table[1][:8] == ["type4", "fused", "factors", "math", str(queries), size, "16x20", str(queries * 320)]
    assert {row["kernel"] for row in rows.values()} == {"math"}  # CPU with dropout: SDPA's math kernel


def test_coattn_mode_reports_type4_taking_g_past_its_grid_limit(capsys):
    rc = benchmark.cli(["coattn", "--variants", "type4", "--routes", "fused", "--queries", "4", "--sizes", "42x42",
                        "43x42", "--stride", "1", "--batch_size", "1", "--hidden_dim", "8", "--nheads", "2",
                        "--iters", "1", "--warmup", "0", "--device", "cpu", "--dropout", "0"])
    assert rc == 0
    _, *table = md_tables.rows(capsys.readouterr().out)
    assert [(row[2], row[6]) for row in table] == [("factors", "42x42"), ("G", "43x42")]
    # without dropout: CPU flash for the factors (v padded to the q/k head dim); a mask that needs a gradient
    # (G in training) sends SDPA to its math kernel
    assert [row[3] for row in table] == ["flash_attention", "math"]


def test_help_lists_the_modes(capsys):
    assert benchmark.cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {mode} " in out for mode in benchmark.MODES)


@pytest.mark.parametrize("spec, shape", [("800", (800, 1333)), ("512", (512, 853)), ("1333", (1333, 1333)),
                                         ("600x900", (600, 900))])
@pytest.mark.quick
def test_image_shape(spec, shape):
    assert benchmark_common.image_shape(spec) == shape


@pytest.mark.parametrize("spec", ["abc", "800x", "0", "10x-5"])
def test_image_shape_rejects(spec):
    with pytest.raises(UserError, match="--sizes"):
        benchmark_common.image_shape(spec)


def test_synthetic_batch_is_fixed_and_valid():
    samples, targets = benchmark_steps.synthetic_batch(3, 40, 60, num_classes=7)
    again, targets_again = benchmark_steps.synthetic_batch(3, 40, 60, num_classes=7)
    assert samples.tensors.shape == (3, 3, 40, 60) and not samples.mask.any()
    assert torch.equal(samples.tensors, again.tensors)
    for t, u in zip(targets, targets_again):
        assert torch.equal(t["boxes"], u["boxes"]) and torch.equal(t["labels"], u["labels"])
        lo, hi = benchmark_steps.BOXES_PER_IMAGE
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
    (["--variants", "type1", "--", "--prior_impl", "explicit"], "--prior_impl is set by the benchmark"),
    (["--variants", "type1", "--routes", "fast"], "--routes: unknown fast; choose from fused explicit"),
    (["model", "--variants", "none", "none"], "given twice"),
    (["coattn", "--variants", "type9"], "--variants: unknown type9"),
    (["coattn", "--routes", "fused", "fused"], "given twice"),
    (["coattn", "--hidden_dim", "30", "--nheads", "8"], "--hidden_dim 30 must be divisible by --nheads 8"),
    (["coattn", "--sizes", "0"], "--sizes '0'"),
    (["--variants", "none", "--", "--no_such_flag", "1"], "unknown --no_such_flag 1"),
    (["--variants", "none", "--", "--hidden_dim", "x"], "--hidden_dim: invalid int value"),
    (["--variants", "none", "--device", "cpu", "--amp"], "--amp uses bf16 autocast on CUDA"),
    (["--variants", "type2+query_mixture", "--queries", "1"], "--query_mixture needs at least 2 queries"),
])
@pytest.mark.quick
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert benchmark.cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_invalid_variant_exits_2_from_the_command_line():
    proc = run_script("experiments.benchmark", ["--variants", "bogus"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --variants: unknown bogus; choose from "
                                   + " ".join(benchmark_model.MODEL_VARIANTS))


@pytest.mark.parametrize("meter_class", [benchmark_common.CpuKernelPeakRss, benchmark_common.CpuSampledRss])
def test_cpu_memory_meters_see_a_freed_peak(meter_class):
    """A 256 MiB buffer touched and freed during the timed window shows up in the peak, not in the baseline."""
    if meter_class is benchmark_common.CpuKernelPeakRss and not benchmark_common.can_reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    meter = meter_class()
    meter.start()
    meter.reset_peak()
    buffer = torch.ones(256 * benchmark_common.MIB // 4)  # float32: 256 MiB, every page written
    time.sleep(20 * benchmark_common.RSS_SAMPLE_SECONDS)  # the sampling thread gets several looks at it
    del buffer
    peak_mib = meter.peak() / benchmark_common.MIB
    assert 250 <= peak_mib < 1024


@pytest.mark.parametrize("meter_class", [benchmark_common.CpuKernelPeakRss, benchmark_common.CpuSampledRss])
def test_cpu_peak_follows_live_tensors_not_freed_ones(meter_class):
    """The memory pass's setting (return_freed_memory, malloc_trim before the measured call): 192 MiB freed
    before the measured call do not count; the call's own 64 MiB do, in 2 MiB tensors, which glibc would
    otherwise keep in its heap once its dynamic mmap threshold has grown."""
    if meter_class is benchmark_common.CpuKernelPeakRss and not benchmark_common.can_reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    if not benchmark_common.return_freed_memory():
        pytest.skip("no glibc mallopt here")
    chunk = 2 * benchmark_common.MIB // 4  # float32 elements of 2 MiB

    def step(count):
        tensors = [torch.ones(chunk) for _ in range(count)]  # every page written
        time.sleep(20 * benchmark_common.RSS_SAMPLE_SECONDS)  # the sampling thread gets several looks
        del tensors

    meter = meter_class()
    meter.start()
    step(96)  # a first call, larger than the measured one
    meter.reset_peak()
    step(32)
    peak_mib = meter.peak() / benchmark_common.MIB
    assert 60 <= peak_mib < 90


@pytest.mark.quick
def test_tensor_peak_is_exact_and_counts_what_the_build_keeps():
    """The default CPU meter counts tensor bytes exactly: the build's 4 MiB kept, the call's two live 16 MiB
    tensors at its peak (an 8 MiB one after they are freed does not add), not the larger first call before."""
    mib = benchmark_common.MIB

    def build():
        kept = torch.zeros(4 * mib // 4)  # float32, lives as long as the step

        calls = []

        def step():
            size = 16 if calls else 64  # MiB: the measured (second) call is the smaller
            calls.append(size)
            a = torch.ones(size * mib // 4)
            b = a * 2
            del a, b
            return torch.ones(8 * mib // 4).sum() + kept.sum()

        return step

    peak = benchmark_common.peak_memory(build, torch.device("cpu"), benchmark_common.CpuTensorPeak())
    assert 36 * mib <= peak < 36 * mib + 4096  # 4 + 2 x 16 MiB, plus a few bytes of scalars


@pytest.mark.quick
def test_memory_only_model_mode_measures_without_rounds(capsys):
    """--memory_only: one peak per cell, no timed rounds ('-' in the time columns), the tensor meter's line."""
    rc = benchmark.cli(["model", "--device", "cpu", "--queries", "5", "--sizes", "64x64", "--batch_size", "1",
                        "--variants", "none", "type2", "--routes", "fused", "--steps", "train", "--memory_only",
                        "--", *TINY_MODEL])
    out = capsys.readouterr().out
    assert rc == 0
    assert "no timed rounds (--memory_only)" in out
    assert f"memory: {benchmark_common.CpuTensorPeak.method}" in out
    header, *rows = md_tables.rows(out)
    assert [r[:2] for r in rows] == [["none", "-"], ["type2", "fused"]]
    cells = [dict(zip(header, r)) for r in rows]
    assert all(c["train ms"] == "-" and c["train time /none"] == "-" for c in cells)
    assert all(float(c["train MiB"]) > 0 for c in cells) and cells[0]["train mem /none"] == "1.000"
