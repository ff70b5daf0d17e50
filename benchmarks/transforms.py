"""Speed of every flow beside Pyro's equivalent, at matched architecture.

Times one training step of a single block — forward, log-det, backward to the parameters —
on a batch of 256 fresh inputs (so no cache can answer), at d = 10, 100, 1000. Ours and
Pyro's runs are interleaved and the median of the repeats is reported with their ratio.

Architecture: Pyro's helper defaults (hidden [10d, 10d] for splines, [10d] for affine
coupling, [3d + 1] for IAF/MAF, hidden factors [8, 8] for BNAF, d // 2 + 1 reflections),
with hidden widths capped at 1024 so that d = 1000 fits in memory (Pyro's default would be
two 10,000-wide layers). Both sides always get the same widths, bins and bound.

    python -m benchmarks.transforms            # full run, writes benchmarks/results/transforms.md
    python -m benchmarks.transforms --quick    # d = 10, 100 only
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import pyro.distributions.transforms as P
import torch
from pyro.nn import AutoRegressiveNN, DenseNN
from torch.distributions.transforms import _InverseTransform

from pyroflows import transforms as T

BATCH = 256
CAP = 1024
OUT = Path(__file__).parent / "results" / "transforms.md"


def width(n: int) -> int:
    return min(n, CAP)


def pyro_rqs_coupling(d: int, hidden: list[int]) -> P.SplineCoupling:
    """Pyro's SplineCoupling with the rational-quadratic spline (order='quadratic'), like ours."""
    split, k = d // 2, 8
    net = DenseNN(
        split, hidden, param_dims=[(d - split) * k, (d - split) * k, (d - split) * (k - 1)]
    )
    return P.SplineCoupling(d, split, net, count_bins=k, bound=3.0, order="quadratic")


def pairs(d: int):
    """(name, our module, Pyro's module, direction) at matched architecture."""
    spline_h = [width(10 * d)] * 2
    iaf_h = [width(3 * d + 1)]
    count = d // 2 + 1
    count += count % 2  # ours pairs reflections; give Pyro the same number
    yield (
        "nsf",
        T.build("nsf", d, num_layers=1, hidden_dims=spline_h),
        P.spline_coupling(d, hidden_dims=spline_h),
    )
    yield (
        "nsf (vs Pyro RQS)",
        T.build("nsf", d, num_layers=1, hidden_dims=spline_h),
        (pyro_rqs_coupling(d, spline_h)),
    )
    if d <= 100:  # Pyro's spline AR at d = 1000 needs a 1000 x 1024 x 31000 MADE
        yield (
            "nsf_ar",
            T.build("nsf_ar", d, num_layers=1, hidden_dims=spline_h),
            (P.spline_autoregressive(d, hidden_dims=spline_h)),
        )
    yield (
        "realnvp",
        T.build("realnvp", d, num_layers=1, hidden_dims=[width(10 * d)]),
        (P.affine_coupling(d, hidden_dims=[width(10 * d)])),
    )
    yield (
        "iaf",
        T.build("iaf", d, num_layers=1, hidden_dims=iaf_h),
        P.AffineAutoregressive(AutoRegressiveNN(d, iaf_h)),
    )
    # MAF's one-pass direction is density evaluation (the inverse); time that on both sides.
    yield (
        "maf (density)",
        T.build("maf", d, num_layers=1, hidden_dims=iaf_h).inv,
        (P.AffineAutoregressive(AutoRegressiveNN(d, iaf_h))),
    )
    yield "planar", T.build("planar", d, num_layers=1), P.Planar(d)
    yield "radial", T.build("radial", d, num_layers=1), P.Radial(d)
    yield (
        "sylvester",
        T.build("sylvester", d, num_layers=1, count_transforms=count),
        (P.Sylvester(d, count)),
    )
    yield "householder", T.build("householder", d, count_transforms=count), P.Householder(d, count)
    if d <= 100:  # an (8d x 8d) block matrix per layer: 8000^2 floats at d = 1000 on both
        yield "bnaf", T.build("bnaf", d), P.BlockAutoregressive(d, residual="gated")
    yield "permute", T.build("permute", d), P.Permute(torch.randperm(d))
    for name in ("lu", "actnorm", "nice", "glow"):
        yield name, T.build(name, d, num_layers=1), None


def step_time(flow, d: int) -> float:
    # an inverse view (``flow.inv``) trains its underlying module
    module = flow._inv if isinstance(flow, _InverseTransform) else flow
    params = [p for p in getattr(module, "parameters", list)() if p.requires_grad]
    x = torch.randn(BATCH, d)
    start = time.perf_counter()
    y = flow(x)
    loss = y.square().sum() - flow.log_abs_det_jacobian(x, y).sum()
    if params:
        loss.backward()
    return time.perf_counter() - start


def median_ms(flows, d: int, repeats: int) -> list[float]:
    """Interleaved runs in shuffled order, so drift in machine load hits every flow alike."""
    for flow in flows:
        for _ in range(3):
            step_time(flow, d)
    times = [[] for _ in flows]
    for _ in range(repeats):
        for i in random.sample(range(len(flows)), len(flows)):
            times[i].append(step_time(flows[i], d))
    return [1e3 * statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 10 and 100 only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dims = [10, 100] if args.quick else [10, 100, 1000]
    rows = []
    for d in dims:
        repeats = 30 if d < 1000 else 7
        for name, ours, pyro in pairs(d):
            flows = [ours] if pyro is None else [ours, pyro]
            times = median_ms(flows, d, repeats)
            ratio = "" if pyro is None else f"{times[1] / times[0]:.2f}x"
            pyro_ms = "—" if pyro is None else f"{times[1]:.2f}"
            rows.append(f"| {d} | {name} | {times[0]:.2f} | {pyro_ms} | {ratio} |")
            print(rows[-1], flush=True)
    header = [
        "# Transform speed: pyroflows vs Pyro at matched architecture",
        "",
        f"One block, forward + log-det + backward, batch {BATCH}, median ms over repeats in",
        f"shuffled order, {args.threads} CPU threads, torch {torch.__version__}.",
        "'speed-up' = Pyro / ours.",
        "",
        "| d | flow | ours (ms) | Pyro (ms) | speed-up |",
        "|---|---|---|---|---|",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
