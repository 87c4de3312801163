"""experiments/benchmark_parts.py: a training step's parts are recorded with their real inputs (a replayed part
gives the output the module gave in the step), cover the model's modules once, and the mode's table is complete."""
import pytest
import torch

from experiments import benchmark, benchmark_parts
from experiments.benchmark_model import Config, variant_args
from experiments.benchmark_steps import Built, synthetic_batch
from tests import md_tables

TINY = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "2", "--dec_layers", "2",
        "--dim_feedforward", "64", "--dropout", "0"]


def _tiny(variant):
    config = Config(variants=[variant], queries=[7], sizes=[(64, 96)], model_flags=TINY)
    args = variant_args(config, variant, 7, "fused")
    batch = synthetic_batch(2, 64, 96, args.num_classes)
    return args, batch


@pytest.mark.quick
@pytest.mark.parametrize("variant, encoder", [("type2", ["transformer.encoder.layers.0", "transformer.encoder.layers.1"]),
                                              ("ms_P_IIMII", [f"transformer.encoder.layers.{i}" for i in range(5)])])
def test_parts_replay_the_outputs_of_the_step(variant, encoder):
    """Every part, called on what was recorded, returns what the module returned inside the model's forward
    (dropout 0, same weights): the recorded inputs are the step's. Containers (the transformer, the encoder)
    are not parts themselves; their layers are."""
    args, (samples, targets) = _tiny(variant)
    built = Built(args, torch.device("cpu"))
    modules = dict(built.module.named_modules())
    seen = {}

    def keep_first_output(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output)  # returns None: the model's output stays its own
        return hook

    handles = [m.register_forward_hook(keep_first_output(name)) for name, m in modules.items()]
    calls = benchmark_parts.record_calls(built, samples, targets)
    for handle in handles:
        handle.remove()
    parts = [name for name in calls if name not in (benchmark_parts.CRITERION, benchmark_parts.MATCHER)]
    assert [p for p in parts if p.startswith("transformer.encoder.layers")] == encoder
    assert {"backbone.0", "transformer.decoder.layers.0", "transformer.decoder.layers.1",
            "transformer.decoder.priors.0", "transformer.decoder.priors.1", "class_embed", "bbox_embed"} <= set(parts)
    assert not {"transformer", "transformer.encoder", "transformer.decoder", "backbone"} & set(parts)
    assert len(calls[benchmark_parts.MATCHER]) == args.dec_layers  # final + aux outputs
    for name in ["transformer.encoder.layers.0", "transformer.decoder.layers.1", "transformer.decoder.priors.1",
                 "bbox_embed"]:
        (call_args, call_kwargs), = calls[name][:1]
        replay = modules[name](*call_args, **call_kwargs)
        expected = seen[name]
        replay, expected = (replay, expected) if isinstance(replay, torch.Tensor) else (replay[0], expected[0])
        torch.testing.assert_close(replay, expected, rtol=0, atol=1e-6)


@pytest.mark.quick
def test_parts_mode_table(capsys):
    rc = benchmark.cli(["parts", "--variants", "ms_P_IIMII", "--queries", "7", "--size", "64x96", "--samples", "10",
                        "--warmup", "0", "--device", "cpu", "--", *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [md_tables.cells(line) for line in out.splitlines() if line.startswith("| ms_P_IIMII")]
    parts = [r[1] for r in rows]
    assert parts[0] == benchmark_parts.STEP and parts[-1] == benchmark_parts.REST
    assert [p for p in parts if p.startswith("transformer.encoder.layers")] == [
        f"transformer.encoder.layers.{i} ({kind})" for i, kind in enumerate("IIMII")]
    assert {benchmark_parts.CRITERION, benchmark_parts.MATCHER, benchmark_parts.OPTIMIZER} <= set(parts)
    shares = [float(r[4].split("%")[0]) for r in rows[1:]]
    assert all(0 <= s < 100 for s in shares)
    step_ms = float(rows[0][3])
    assert sum(float(r[3]) for r in rows[1:] if r[1] != benchmark_parts.MATCHER) == pytest.approx(step_ms, rel=0.5)


def test_bad_variant_is_one_line(capsys):
    assert benchmark.cli(["parts", "--variants", "bogus"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --variants: unknown bogus; choose from none")
