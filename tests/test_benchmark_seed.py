"""experiments/benchmark_seed.py: the original SMCA code is imported from a checkout without disturbing this repo's
packages of the same names, its parser is its main.py's alone, and its step is timed beside the fork's.

The original code cannot be cloned here (no internet in CI), so the checkout is a stand-in written below with
the original's layout and the three things the harness has to get past: a main.py whose imports would fail if
run, a util/misc.py that misreads torchvision's version at import, and a backbone that asks is_main_process()
whether to download weights."""
import sys

import pytest
import torchvision

import models
import util.misc
from experiments import benchmark, benchmark_seed
from tests import md_tables

TINY = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1",
        "--dim_feedforward", "64", "--dropout", "0"]

MAIN = '''
import argparse
import datasets_the_harness_must_not_import


def get_args_parser():
    parser = argparse.ArgumentParser('stand-in', add_help=False)
    parser.add_argument('--lr', default=1e-4, type=float)
    parser.add_argument('--lr_backbone', default=1e-5, type=float)
    parser.add_argument('--weight_decay', default=1e-4, type=float)
    parser.add_argument('--clip_max_norm', default=0.1, type=float)
    parser.add_argument('--dynamic_scale', default="type1", type=str)
    parser.add_argument('--num_queries', default=100, type=int)
    parser.add_argument('--device', default='cuda')
    return parser


datasets_the_harness_must_not_import.run()
'''
MISC = '''
import torch
import torchvision
if float(torchvision.__version__[:3]) < 0.7:
    from torchvision.ops import _new_empty_tensor  # gone from torchvision: the import fails


def is_main_process():
    return True


class NestedTensor:
    def __init__(self, tensors):
        self.tensors = tensors


def nested_tensor_from_tensor_list(images):
    return NestedTensor(torch.stack(images))
'''
BACKBONE = '''
from torch import nn
from util.misc import is_main_process


class Backbone(nn.Conv2d):
    def __init__(self):
        super().__init__(3, 4, 3)
        self.pretrained = is_main_process()  # the original: torchvision's pretrained=is_main_process()
'''
MODELS = '''
import torch
from torch import nn
from .backbone import Backbone

BUILT = []  # (dynamic_scale, num_queries, device, pretrained) of every build


class Model(nn.Module):
    def __init__(self, num_queries):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Linear(4, num_queries * 4)

    def forward(self, samples):
        nested, targets = samples  # the original's (images, targets) pair
        features = self.backbone(nested.tensors).mean(dim=(2, 3))  # (B, 4)
        return {"pred_boxes": self.head(features).sigmoid().view(len(targets), -1, 4)}


class Criterion(nn.Module):
    weight_dict = {"loss_boxes": 1.0}

    def forward(self, outputs, targets):
        return {"loss_boxes": outputs["pred_boxes"].sum()}


def build_model(args):
    model = Model(args.num_queries)
    BUILT.append((args.dynamic_scale, args.num_queries, args.device, model.backbone.pretrained))
    return model, Criterion(), {}
'''


@pytest.fixture
def checkout(tmp_path):
    files = {"main.py": MAIN, "util/__init__.py": "", "util/misc.py": MISC, "models/__init__.py": MODELS,
             "models/backbone.py": BACKBONE, "models/transformer.py": ""}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.quick
def test_original_code_is_imported_beside_this_repos_packages(checkout):
    version, ours = torchvision.__version__, {name: sys.modules[name] for name in ("models", "util", "util.misc")}
    seed = benchmark_seed.load_seed(str(checkout))
    assert {name: sys.modules[name] for name in ours} == ours  # our modules are back, the same objects
    assert not [name for name, module in sys.modules.items()
                if str(checkout) in (getattr(module, "__file__", None) or "")]  # the original's are gone
    assert torchvision.__version__ == version
    assert seed.build_model.__module__ == "models" and seed.build_model is not getattr(models, "build_model", None)
    assert seed.nested_tensor_from_tensor_list is not util.misc.nested_tensor_from_tensor_list
    args = benchmark_seed.seed_args(seed, "type3", 17, "cpu")
    assert (args.dynamic_scale, args.num_queries, args.device, args.lr_backbone) == ("type3", 17, "cpu", 1e-5)
    model, _, _ = seed.build_model(args)
    assert seed.build_model.__globals__["BUILT"] == [("type3", 17, "cpu", False)]  # no weights download asked


@pytest.mark.quick
def test_seed_mode_times_both_codes_in_the_same_rounds(checkout, capsys):
    rc = benchmark.cli(["seed", "--seed_repo", str(checkout), "--queries", "5", "--size", "64x96", "--samples", "10",
                        "--warmup", "0", "--device", "cpu", "--accels", "default", "channels_last", "--", *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {md_tables.cells(line)[0]: line for line in out.splitlines() if line.startswith("| ")}
    assert list(rows) == ["cell", "seed", "fork default", "fork channels_last"]
    assert "| 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 1.000 |" in rows["seed"]
    for cell in ("fork default", "fork channels_last"):
        time_ms, cpu_ms, mib = (float(v) for v in md_tables.cells(rows[cell])[1:4])
        assert time_ms > 0 and cpu_ms > 0 and mib > 0
    built = benchmark_seed.load_seed(str(checkout)).build_model.__globals__["BUILT"]
    assert built == []  # a fresh import: the run's builds were in the module imported by the run


def test_seed_mode_timings_are_paired_per_round(checkout):
    seed = benchmark_seed.load_seed(str(checkout))
    config = benchmark_seed.seed_config("type2", ["default"], 5, (64, 96), batch_size=2, warmup=0, samples=10,
                                        device="cpu", memory="tensors", model_flags=TINY)
    rows = benchmark_seed.run(seed, config, log=lambda line: None)
    assert [r.cell for r in rows] == ["seed", "fork default"]
    assert seed.build_model.__globals__["BUILT"][0] == ("type2", 5, "cpu", False)
    seed_row, fork_row = rows
    assert len(seed_row.times["train"]) == len(fork_row.times["train"]) == 10
    per_round = sorted(f / s for f, s in zip(fork_row.times["train"], seed_row.times["train"]))
    assert fork_row.vs_seed["time"].median == pytest.approx((per_round[4] + per_round[5]) / 2)
    assert fork_row.vs_seed["time"].low <= fork_row.vs_seed["time"].median <= fork_row.vs_seed["time"].high


@pytest.mark.quick
@pytest.mark.parametrize("remove, message", [("models/__init__.py", "no models/__init__.py"),
                                             ("main.py", "no main.py")])
def test_not_a_checkout_is_one_line(checkout, capsys, remove, message):
    (checkout / remove).unlink()
    rc = benchmark.cli(["seed", "--seed_repo", str(checkout), "--samples", "10", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: --seed_repo {checkout}: {message}") and "git clone" in err[0]
