"""Local latents in subsampled plates: accuracy against an exact posterior, and cost.

    python -m benchmarks.locals                  # accuracy: results/locals.md (3 seeds)
    python -m benchmarks.locals --guides AutoFlowGuide --seeds 0   # one guide, one seed
    python -m benchmarks.locals --scale          # ms/step against the number of groups
    python -m benchmarks --posteriors eight_schools_centered --seeds 0 1 2 \
        --guides AutoFlowGuide "AutoFlowGuide local_plates=['J']"  # the schools as locals

Accuracy: a centred normal hierarchical model, ``theta_i ~ N(mu, tau)``,
``y_i ~ N(theta_i, sigma_i)``, 1,000 groups, subsample 100. The locals integrate out
(``y_i ~ N(mu, sqrt(tau^2 + sigma_i^2))``), so the posterior of ``(mu, log tau)`` is exact on
a 2-D grid and every local's mean and sd follow from it. Three guides, each fitted by
``pyroflows.fit`` (6,000 steps at most, its defaults; the same for all): ``AutoFlowGuide``
(local latents: the model's prior times each member's Gaussian; then also its draws
importance-resampled, ``importance_resample`` on the full data: the globals weighted with
each member integrated out; and the learned prior, ``local_prior="learned"``, alone and with
``loss="iwae", num_particles=16``), the recipe the old error message gave
(``AutoGuideList``: a flow on the globals, ``AutoNormal`` on the locals) and ``AutoNormal``.
Errors are in posterior sds; for ``AutoFlowGuide``, the globals' k-hat on the full data
(``globals_diagnostic``, 1,000 draws, each member integrated out; for the resampled rows,
the resampling's own).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuideList, AutoNormal

from pyroflows import AutoFlowGuide, fit, globals_diagnostic, importance_resample

RESULTS = Path(__file__).parent / "results"
GROUPS, SUBSAMPLE, STEPS, DRAWS = 1000, 100, 6000, 4000


def make_data(seed: int, groups: int = GROUPS):
    generator = torch.Generator().manual_seed(seed)
    sigma = 1.0 + 2.0 * torch.rand(groups, generator=generator, dtype=torch.float64)
    theta = 1.0 + 0.5 * torch.randn(groups, generator=generator, dtype=torch.float64)
    y = theta + sigma * torch.randn(groups, generator=generator, dtype=torch.float64)
    return sigma.float(), y.float()


def model(sigma, y, subsample_size=SUBSAMPLE):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", len(y), subsample_size=subsample_size) as idx:
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma[idx]), obs=y[idx])


def exact(sigma, y, points: int = 400):
    """Posterior means and sds of mu, tau and every theta_i, on a grid over (mu, log tau)."""
    sigma, y = sigma.double(), y.double()
    half = 8 * float((y.var() + (sigma**2).mean()).sqrt()) / math.sqrt(len(y))
    mu = torch.linspace(float(y.mean()) - half, float(y.mean()) + half, points)
    log_tau = torch.linspace(-14.0, 2.5, points)
    m, lt = torch.meshgrid(mu, log_tau, indexing="ij")
    tau = lt.exp()
    log_p = dist.Normal(0.0, 5.0).log_prob(m) + dist.HalfNormal(5.0).log_prob(tau) + lt
    for chunk in torch.split(torch.arange(len(y)), 100):
        total = (tau[..., None] ** 2 + sigma[chunk] ** 2).sqrt()
        log_p = log_p + dist.Normal(m[..., None], total).log_prob(y[chunk]).sum(-1)
    w = torch.softmax(log_p.reshape(-1), 0).reshape(log_p.shape)
    edges = (w[0].sum(), w[-1].sum(), w[:, 0].sum(), w[:, -1].sum())
    assert max(edges) < 1e-6, f"the grid is too narrow: {edges}"
    out = {}
    for name, value in (("mu", m), ("tau", tau)):
        mean = (w * value).sum()
        out[name] = (float(mean), float(((w * (value - mean) ** 2).sum()).sqrt()))
    # theta_i | mu, tau, y_i ~ N(c_i, v_i): its mean and variance over the grid
    mean = torch.zeros(len(y), dtype=torch.float64)
    second = torch.zeros(len(y), dtype=torch.float64)
    flat_w, flat_m, flat_t = w.reshape(-1), m.reshape(-1), tau.reshape(-1)
    keep = flat_w > 1e-12
    flat_w, flat_m, flat_t = flat_w[keep] / flat_w[keep].sum(), flat_m[keep], flat_t[keep]
    precision = 1.0 / flat_t[:, None] ** 2 + 1.0 / sigma**2
    c = (flat_m[:, None] / flat_t[:, None] ** 2 + y / sigma**2) / precision
    mean = (flat_w[:, None] * c).sum(0)
    second = (flat_w[:, None] * (c**2 + 1.0 / precision)).sum(0)
    out["theta"] = (mean, (second - mean**2).sqrt())
    return out


def moments_autonormal(guide: AutoNormal) -> dict:
    """Means and sds straight from AutoNormal's parameters (tau is LogNormal under it)."""
    locs, scales = guide.locs, guide.scales
    names = {n.removesuffix("_unconstrained") for n, _ in locs.named_parameters()}
    out = {}
    if "mu" in names:
        out["mu"] = (float(locs.mu), float(scales.mu))
    if "tau" in names:
        lt, st = float(locs.tau), float(scales.tau)
        mean = math.exp(lt + st**2 / 2)
        out["tau"] = (mean, mean * math.sqrt(math.expm1(st**2)))
    out["theta"] = (locs.theta.detach(), scales.theta.detach())
    return out


def moments_draws(samples: dict) -> dict:
    return {n: (v.mean(0), v.std(0)) for n, v in samples.items()}


def errors(estimate: dict, truth: dict) -> dict:
    out = {}
    for name in ("mu", "tau"):
        (m, s), (tm, ts) = estimate[name], truth[name]
        out[name] = (abs(float(m) - tm) / ts, abs(math.log(float(s) / ts)))
    (m, s), (tm, ts) = estimate["theta"], truth["theta"]
    out["theta"] = (
        float(((m.double() - tm).abs() / ts).median()),
        float((s.double() / ts).log().abs().median()),
    )
    return out


def run_guide(name: str, seed: int, sigma, y) -> tuple[dict, float, str]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    options = {}
    if name.startswith("AutoFlowGuide"):
        guide = AutoFlowGuide(model, local_prior="learned" if LEARNED in name else "model")
        if name in (MEMBER_BOUND, MODEL_BOUND):
            options = {"loss": "iwae", "num_particles": 16}
    elif name == "AutoGuideList (flow + AutoNormal)":
        guide = AutoGuideList(model)
        guide.append(AutoFlowGuide(poutine.block(model, hide=["theta"])))
        guide.append(AutoNormal(poutine.block(model, expose=["theta"])))
    else:
        guide = AutoNormal(model)
    start = time.perf_counter()
    result = fit(model, guide, sigma, y, num_steps=STEPS, progress=False, seed=seed, **options)
    seconds = time.perf_counter() - start
    khat = None
    if name == RESAMPLED:  # full data (subsample_size=None): every member weighs in
        out = importance_resample(model, guide, sigma, y, None, num_samples=DRAWS, seed=seed)
        seconds = time.perf_counter() - start
        estimate, khat = moments_draws(out.samples), out.diagnostic.k_hat
    elif name.startswith("AutoFlowGuide"):
        estimate = moments_draws(guide.sample_posterior(DRAWS, seed=seed))
        # the globals' k-hat on the full data, each member integrated out
        khat = globals_diagnostic(model, guide, sigma, y, None, num_samples=1000).k_hat
    elif name == "AutoNormal":
        estimate = moments_autonormal(guide)
    else:
        flow, normal = guide[0], guide[1]
        estimate = moments_draws(flow.sample_posterior(DRAWS, seed=seed))
        estimate["theta"] = moments_autonormal(normal)["theta"]
    return estimate, seconds, f"{result.num_steps} steps", khat


LEARNED = "AutoFlowGuide, local_prior='learned'"
MEMBER_BOUND = f"{LEARNED}, loss='iwae', num_particles=16 (the bound member by member)"
RESAMPLED = "AutoFlowGuide + importance_resample (the globals weighted on the full data)"
MODEL_BOUND = "AutoFlowGuide, loss='iwae', num_particles=16 (the bound member by member)"
GUIDES = (
    "AutoFlowGuide",
    RESAMPLED,
    MODEL_BOUND,
    LEARNED,
    MEMBER_BOUND,
    "AutoGuideList (flow + AutoNormal)",
    "AutoNormal",
)


HEADER = [
    "| seed | guide | mu abs(Δmean)/sd | mu abs(log sd ratio) | tau abs(Δmean)/sd "
    "| tau abs(log sd ratio) | theta median abs(Δmean)/sd | theta median abs(log sd ratio) "
    "| steps | s | globals k-hat |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def accuracy(seeds=(0, 1, 2), guides=GUIDES) -> None:
    """Append one row per (seed, guide) to results/locals.jsonl, then render locals.md."""
    torch.set_num_threads(2)
    for seed in seeds:
        sigma, y = make_data(seed)
        truth = exact(sigma, y)
        for name in guides:
            estimate, seconds, steps, khat = run_guide(name, seed, sigma, y)
            row = {"seed": seed, "guide": name, "errors": errors(estimate, truth)}
            row.update(steps=steps, seconds=round(seconds, 1), globals_khat=khat)
            with (RESULTS / "locals.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)
    render()


def render() -> None:
    """locals.md from the newest row per (seed, guide) of results/locals.jsonl."""
    rows = {}
    for line in (RESULTS / "locals.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[(row["guide"], row["seed"])] = row
    lines = [
        f"Centred normal hierarchical model, {GROUPS} groups, subsample {SUBSAMPLE}, `fit` "
        f"(at most {STEPS} steps, defaults); errors against the exact posterior (grid), "
        f"{DRAWS} guide draws (noise floor of a mean about {1 / math.sqrt(DRAWS):.3f} sd).",
        "Rows marked *rejected* are earlier designs of the local guide, kept for the record.",
        "",
        *HEADER,
    ]
    for (guide, seed), row in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        e = row["errors"]
        lines.append(
            f"| {seed} | {guide} | {e['mu'][0]:.3f} | {e['mu'][1]:.3f} | {e['tau'][0]:.3f} "
            f"| {e['tau'][1]:.3f} | {e['theta'][0]:.3f} | {e['theta'][1]:.3f} "
            f"| {row['steps']} | {row['seconds']:.0f} | {_khat(row.get('globals_khat'))} |"
        )
    (RESULTS / "locals.md").write_text("\n".join(lines) + "\n")


def _khat(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def one_scale_point(guide_name: str, groups: int, steps: int = 200) -> None:
    """In a fresh process: ms per step and peak memory of one guide at one size."""
    torch.set_num_threads(1)
    sigma, y = make_data(0, groups)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pyro.clear_param_store()
    # local_plates: the same guide at every size (at 1,000 groups the plate is whole)
    local = AutoFlowGuide(model, local_plates=["groups"])
    guide = local if guide_name == "AutoFlowGuide" else AutoNormal(model)
    subsample = 1000
    fit(model, guide, sigma, y, subsample, num_steps=20, progress=False, diagnose=False,
        fast=False, stop_early=False)
    start = time.perf_counter()
    fit(model, guide, sigma, y, subsample, num_steps=steps, progress=False, diagnose=False,
        fast=False, stop_early=False)
    ms = (time.perf_counter() - start) / steps * 1000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() * p.element_size() for p in guide.parameters()) / 2**20
    print(f"{ms:.2f} {(peak - before) / 1024:.0f} {params:.1f}")


def scale(sizes=(10**3, 10**4, 10**5, 10**6), repeats: int = 3) -> None:
    lines = [
        "Per-step time of `fit` (general path, 1 thread, subsample 1,000, one process per "
        "run, the median of 3 interleaved runs) against the number of groups; memory is the "
        "process's peak RSS growth (MiB) beside the guide's parameters (MiB). AutoFlowGuide "
        "with `local_plates=['groups']`, so that the plate is local at 1,000 groups too.",
        "",
        "| groups | AutoFlowGuide ms/step | AutoNormal ms/step | ratio | AutoFlowGuide peak "
        "MiB (params) | AutoNormal peak MiB (params) |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for groups in sizes:
        runs = {"AutoFlowGuide": [], "AutoNormal": []}
        for _ in range(repeats):  # interleaved: this machine's speed drifts between runs
            for name, seen in runs.items():
                code = (
                    f"from benchmarks.locals import one_scale_point; "
                    f"one_scale_point({name!r}, {groups})"
                )
                out = subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, check=True
                ).stdout.split()
                seen.append([float(v) for v in out[-3:]])
        point = {name: sorted(seen)[len(seen) // 2] for name, seen in runs.items()}  # median
        flow, normal = point["AutoFlowGuide"], point["AutoNormal"]
        rows.append((groups, flow[0], normal[0]))
        lines.append(
            f"| {groups:,} | {flow[0]:.2f} | {normal[0]:.2f} | {flow[0] / normal[0]:.2f} "
            f"| {flow[1]:.0f} ({flow[2]:.1f}) | {normal[1]:.0f} ({normal[2]:.1f}) |"
        )
        print(lines[-1], flush=True)
    (RESULTS / "locals_scale.md").write_text("\n".join(lines) + "\n")
    _plot(rows)


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    groups = [r[0] for r in rows]
    ax.plot(groups, [r[1] for r in rows], "o-", label="AutoFlowGuide (local latents)")
    ax.plot(groups, [r[2] for r in rows], "s--", label="AutoNormal")
    ax.set_xscale("log")
    ax.set_xlabel("groups (subsample 1,000)")
    ax.set_ylabel("ms per step")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "locals_scale.png", dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--guides", nargs="*", default=list(GUIDES), choices=GUIDES)
    parser.add_argument("--report", action="store_true", help="only re-render locals.md")
    args = parser.parse_args(argv)
    if args.report:
        render()
    elif args.scale:
        scale()
    else:
        accuracy(args.seeds, args.guides)


if __name__ == "__main__":
    main()
