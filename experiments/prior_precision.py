"""Logit error of the co-attention routes under bf16 autocast and in float32, against a float64 reference.

    python -m experiments.prior_precision [--grids HxW ...] [--types type1 ...] [--queries Q] [--seed S]

For one randomly initialised co-attention layer (d_model 256, 8 heads, batch 2) and its spatial prior, on
feature grids of the sizes given, with head centres spread over the image and the scales at their start
value (1) or random ((1 + N(0, 0.5))^2, some near 0), it prints the largest |logit - reference| for:

  q.k bf16        bf16's own error: q.k / sqrt(d_h) with q, k rounded to bf16 (what autocast does to DETR)
  explicit bf16   the explicit route under autocast: bf16 q.k plus G rounded to bf16 (its mask dtype)
  fused bf16 dims the fused route with its extra q/k dims in bf16 as well (not used; the reason why)
  fused           the fused route under autocast as implemented: bf16 projections, then the extra dims and
                  SDPA in float32 (type4 on grids past COUPLED_FUSED_MAX_AREA is measured as factors too)
  fused fp32      the fused route without autocast: the float32 error of the factors alone

each over the keys the reference attends to (weight >= 1e-3) and over all keys. The reference is the
explicit route in float64 on the same float32 weights and inputs. The numbers are quoted in
docs/ablation-modules.md ("Fused prior").
"""
import argparse
import copy
import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from models.attention import ModulatedCrossAttention
from models.spatial_prior import SCALES, SpatialPrior, mixture_mask

D_MODEL, NHEAD, BATCH, SMOOTH = 256, 8, 2, 8.0
ATTENDED = 1e-3  # keys with at least this reference attention weight
SCALE_STARTS = ("start", "random")
ROUTES = ("q.k bf16", "explicit bf16", "fused bf16 dims", "fused", "fused fp32")


@dataclass
class Errors:
    grid: Tuple[int, int]
    dynamic_scale: str
    scales: str
    attended: Dict[str, float]  # route -> max |error| over attended keys
    overall: Dict[str, float]  # route -> max |error| over all unpadded keys


def _layer(dynamic_scale: str, scales: str, queries: int, generator: torch.Generator):
    prior = SpatialPrior(D_MODEL, NHEAD, SCALES[dynamic_scale](D_MODEL, NHEAD), SMOOTH,
                         mixture_mask(queries, NHEAD, False, False))
    attention = ModulatedCrossAttention(D_MODEL, NHEAD)
    with torch.no_grad():
        prior.offset.weight.normal_(0, 1 / D_MODEL ** 0.5, generator=generator)  # offsets ~ N(0, 1) cells
        if scales == "random" and dynamic_scale != "type1":
            # u is LayerNorm'd (unit variance per channel): proj(u) ~ 1 + N(0, 0.5), some scales near 0
            prior.scale.proj.weight.normal_(0, 0.5 / D_MODEL ** 0.5, generator=generator)
    return prior, attention


def measure(grid: Tuple[int, int], dynamic_scale: str, scales: str, queries: int, seed: int = 0) -> Errors:
    height, width = grid
    generator = torch.Generator().manual_seed(seed)
    prior, attention = _layer(dynamic_scale, scales, queries, generator)
    tgt = torch.randn(queries, BATCH, D_MODEL, generator=generator)
    query_pos = torch.randn(queries, BATCH, D_MODEL, generator=generator)
    memory = torch.randn(height * width, BATCH, D_MODEL, generator=generator)
    centre = torch.rand(BATCH, queries, 2, generator=generator) * torch.tensor([width, height])
    grid_x, grid_y = torch.arange(width, dtype=torch.float32), torch.arange(height, dtype=torch.float32)
    padding = torch.zeros(BATCH, height * width, dtype=torch.bool)
    query = tgt + query_pos

    with torch.no_grad():
        attention64, prior64 = copy.deepcopy(attention).double(), copy.deepcopy(prior).double()
        g64 = prior64.log_prior(tgt.double(), query_pos.double(), centre.double(), grid_x, grid_y)
        reference = attention64.logits(query.double(), memory.double(), padding, g64)  # (B, nhead, Q, S)
        plain = attention64.logits(query.double(), memory.double(), padding)  # q.k / sqrt(d_h) alone
        factors = prior.factors(tgt, query_pos, centre, grid_x, grid_y)
        fused_fp32 = attention.logits(query, memory, padding, factors)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q = attention._heads(query, *_rows(attention, 0))  # bf16, as autocast's projections give
            k = attention._heads(memory, *_rows(attention, 1))
            fused = attention.logits(query, memory, padding, factors)
        # the kernels multiply bf16 inputs with float32 accumulation: q.k in float32 from the bf16 values
        qk = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
        q_aug, k_aug = attention._augmented(q.float(), k.float(), factors)
        g = prior.log_prior(tgt, query_pos, centre, grid_x, grid_y)
        results = {
            "q.k bf16": qk.double() - plain + reference,  # bf16 q.k with the exact prior
            "explicit bf16": qk + g.bfloat16().float(),  # G enters as a bf16 mask under autocast
            "fused bf16 dims": q_aug.bfloat16().float() @ k_aug.bfloat16().float().transpose(-1, -2),
            "fused": fused,
            "fused fp32": fused_fp32,
        }
    attended = reference.softmax(-1) >= ATTENDED
    errors = {route: (results[route].double() - reference).abs() for route in ROUTES}
    return Errors(grid, dynamic_scale, scales,
                  attended={route: e[attended].max().item() for route, e in errors.items()},
                  overall={route: e.max().item() for route, e in errors.items()})


def _rows(attention: ModulatedCrossAttention, index: int):
    """The (weight, bias) of q (0) or k (1) in the packed input projection."""
    return attention.in_proj_weight.chunk(3)[index], attention.in_proj_bias.chunk(3)[index]


def markdown(rows: Sequence[Errors]) -> str:
    header = ["grid", "type", "scales"] + [f"{route} (attended / all)" for route in ROUTES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(ROUTES)]
    for r in rows:
        cells = [f"{r.grid[0]}x{r.grid[1]}", r.dynamic_scale, r.scales]
        cells += [f"{r.attended[route]:.2g} / {r.overall[route]:.2g}" for route in ROUTES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m experiments.prior_precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", nargs="+", default=["25x42", "42x42", "50x84", "84x84"], metavar="HxW",
                        help="feature grids (R50 at 800x1333 is 25x42, a square 1333 canvas 42x42; DC5 doubles)")
    parser.add_argument("--types", nargs="+", default=list(SCALES), choices=list(SCALES))
    parser.add_argument("--scales", nargs="+", default=list(SCALE_STARTS), choices=SCALE_STARTS)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def cli(argv: List[str] = None) -> int:
    opts = get_args_parser().parse_args(argv)
    grids = []
    for spec in opts.grids:
        try:
            height, width = (int(v) for v in spec.split("x"))
        except ValueError:
            print(f"error: --grids {spec!r}: give HxW, e.g. 25x42", file=sys.stderr)
            return 2
        grids.append((height, width))
    rows = [measure(grid, dynamic_scale, scales, opts.queries, opts.seed)
            for grid in grids for dynamic_scale in opts.types for scales in opts.scales
            if scales == "start" or dynamic_scale != "type1"]  # type1 has no scales
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
