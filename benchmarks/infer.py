"""``pyroflows.infer`` against Pyro's NUTS: time to draws, and their accuracy.

    python -m benchmarks.infer                           # every posterior, seeds 0 1 2
    python -m benchmarks.infer --posteriors funnel_d10 --seeds 0 --nuts
    python -m benchmarks.infer --numpyro --no-infer      # NumPyro's NUTS (the bench extra)
    python -m benchmarks.infer --heldout --nuts --numpyro  # the held-out set (heldout.py)
    python -m benchmarks.infer --report                  # re-render results/infer.md

Each run is a fresh process with ``--threads`` torch threads (default 2): the timed call is
``infer(model, *args, num_samples=10_000, seed=s, progress=False)``, everything from the call
to the draws, scored on those draws (``posteriors.score``). ``--nuts`` adds Pyro's NUTS (one
chain, 500 warm-up, 1000 draws, default settings, ``jit_compile=False``, started at
Pyro's default ``init_to_uniform``, flat priors at the image of zero) on the same
posterior, scored the same way; ``--nuts-jit`` the same with ``jit_compile=True``. Rows go
to ``results/infer.jsonl``; the table to ``results/infer.md``, which RESULTS.md includes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
import traceback
from pathlib import Path

import pyro
import torch

from .heldout import HELDOUT
from .posteriors import ADDED, POSTERIORS, require_posteriordb, score

RESULTS = Path(__file__).parent / "results"
ROWS = RESULTS / "infer.jsonl"
TABLE = RESULTS / "infer.md"
NUM_SAMPLES = 10_000
ALL = {**POSTERIORS, **ADDED, **HELDOUT}


def run_infer(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    from pyroflows import infer

    posterior = ALL[job["posterior"]]()
    pyro.clear_param_store()
    start = time.perf_counter()
    result = infer(
        posterior.model,
        *posterior.args,
        num_samples=job["num_samples"],
        seed=job["seed"],
        progress=False,
        **job.get("options", {}),
    )
    seconds = time.perf_counter() - start
    row = {"seconds": seconds, "label": result.label, "kind": result.kind}
    row["route"] = [[s.name, round(s.seconds, 2), s.accepted] for s in result.route.stages]
    row.update(score(posterior, result.samples))
    return row


def run_nuts(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    from pyro.infer import MCMC, NUTS

    posterior = ALL[job["posterior"]]()
    pyro.set_rng_seed(job["seed"])
    start = time.perf_counter()
    kernel = NUTS(
        posterior.model,
        jit_compile=job.get("jit", False),
        ignore_jit_warnings=True,
        init_strategy=nuts_start,
        max_plate_nesting=4,  # given, or Pyro guesses it by sampling the (flat) prior
    )
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=500, disable_progbar=True)
    mcmc.run(*posterior.args)
    seconds = time.perf_counter() - start
    row = {"seconds": seconds, "divergences": len(mcmc.diagnostics()["divergences"]["chain 0"])}
    row.update(score(posterior, mcmc.get_samples()))
    return row


def nuts_start(site):
    """Pyro's default start for NUTS (uniform in (-2, 2), unconstrained); a flat prior
    (ImproperUniform), which it cannot sample, at the image of zero. (Rows before 2026-12-01
    started every site at the prior's median, which the held-out set's vague priors, e.g.
    InverseGamma(0.001, 0.001), put where NUTS could not start.)"""
    from pyro.infer.autoguide.initialization import init_to_uniform

    from pyroflows import init_to_median

    try:
        return init_to_uniform(site)
    except NotImplementedError:  # ImproperUniform cannot be sampled
        return init_to_median(site)


def run_numpyro(job: dict) -> dict:
    """NumPyro's NUTS on the copy in ``numpyro_ports`` (one chain, 500 warm-up, 1000 draws;
    JIT compilation included in the time)."""
    import jax
    import numpy as np
    from numpyro.infer import MCMC, NUTS

    from .numpyro_ports import port

    posterior = ALL[job["posterior"]]()
    model, args = port(job["posterior"], posterior)
    start = time.perf_counter()
    mcmc = MCMC(NUTS(model), num_warmup=500, num_samples=1000, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(job["seed"]), *args, extra_fields=("diverging",))
    samples = {k: torch.from_numpy(np.asarray(v)) for k, v in mcmc.get_samples().items()}
    seconds = time.perf_counter() - start
    row = {"seconds": seconds, "divergences": int(mcmc.get_extra_fields()["diverging"].sum())}
    row.update(score(posterior, samples))
    return row


def run_one(job: dict) -> dict:
    row = {k: job[k] for k in ("posterior", "method", "seed", "threads")}
    runner = run_infer
    if job["method"].startswith("nuts"):
        runner = run_numpyro if "NumPyro" in job["method"] else run_nuts
    try:
        row.update(runner(job))
    except Exception as error:  # a failed run is a result too
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        row["trace"] = traceback.format_exc(limit=4)[-800:]
    return row


def render() -> None:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    latest = {}
    for row in rows:
        latest[(row["posterior"], row["method"], row["seed"])] = row
    benchmark = {k: r for k, r in latest.items() if k[0] not in HELDOUT}
    heldout = {k: r for k, r in latest.items() if k[0] in HELDOUT}
    lines = [*table(benchmark), ""]
    if heldout:
        lines += [
            "**Held-out set** (`benchmarks/heldout.py`: six posteriordb posteriors frozen on "
            "2026-12-01, before any was run through `infer`; nothing tuned on them):",
            "",
            *table(heldout),
            "",
        ]
    lines += ["![error against wall time, infer and NUTS](results/infer.png)"]
    TABLE.write_text("\n".join(lines) + "\n")
    print(TABLE.read_text())
    plot(latest)


def table(latest: dict) -> list:
    by_posterior = {}
    for (name, method, _), row in sorted(latest.items()):
        by_posterior.setdefault(name, {}).setdefault(method, []).append(row)
    lines = [
        "| posterior | method | seeds | wall s (each) | max Δmean/sd (each) | max log sd (each) "
        "| med Δmean | final draws (seed 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, methods in by_posterior.items():
        for method, group in sorted(methods.items()):
            ok = [r for r in group if "error" not in r]
            if not ok:
                lines.append(f"| {name} | {method} | | error: {group[0]['error']} | | | | |")
                continue

            def each(key, rows=ok):
                return " / ".join(f"{r[key]:.2f}" for r in rows)

            label = ok[0].get("label", f"{ok[0].get('divergences', 0)} divergences")
            med = statistics.median(r["med_dmean"] for r in ok)
            lines.append(
                f"| {name} | {method} | {len(ok)} | {each('seconds')} | {each('max_dmean')} "
                f"| {each('max_dlogsd')} | {med:.3f} | {label} |"
            )
    return lines


def plot(latest: dict) -> None:
    """Error against wall time, one point per run and method: results/infer.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    methods = sorted({method for (_, method, _) in latest})
    for method, marker in zip(methods, "os^Dv", strict=False):
        rows = [r for (_, m, _), r in latest.items() if m == method and "error" not in r]
        for ax, key in zip(axes, ("max_dmean", "max_dlogsd"), strict=True):
            ax.scatter(
                [r["seconds"] for r in rows], [max(r[key], 1e-3) for r in rows],
                marker=marker, label=method, alpha=0.7,
            )  # fmt: skip
    for ax, title in zip(axes, ("max |Δmean| / sd", "max |log sd ratio|"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="wall time of the call (s)", title=title)
        ax.axhline(0.1, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "infer against NUTS (Pyro's, NumPyro's): error against wall time, one point per run"
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "infer.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", nargs="*", default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES)
    parser.add_argument("--nuts", action="store_true", help="also Pyro's NUTS (seed 0)")
    parser.add_argument("--nuts-jit", action="store_true", help="also Pyro's NUTS, jit_compile")
    parser.add_argument("--numpyro", action="store_true", help="also NumPyro's NUTS (seed 0)")
    parser.add_argument("--heldout", action="store_true", help="the held-out set (heldout.py)")
    parser.add_argument("--no-infer", action="store_true")
    parser.add_argument("--method", default="infer", help="row label for these infer runs")
    parser.add_argument("--options", default="{}", help="JSON keywords for infer")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    if not args.report:
        posteriors = args.posteriors or [*(HELDOUT if args.heldout else (*POSTERIORS, *ADDED))]
        require_posteriordb([name for name in posteriors if name not in HELDOUT])
        jobs = []
        for name in posteriors:
            common = {"posterior": name, "threads": args.threads}
            if args.nuts:
                jobs.append({**common, "method": "nuts (Pyro)", "seed": 0})
            if args.nuts_jit:
                jit = {"method": "nuts (Pyro, jit_compile)", "seed": 0, "jit": True}
                jobs.append({**common, **jit})
            if args.numpyro:
                jobs.append({**common, "method": "nuts (NumPyro)", "seed": 0})
            if not args.no_infer:
                options = json.loads(args.options)
                jobs += [
                    {
                        **common,
                        "method": args.method,
                        "seed": s,
                        "options": options,
                        "num_samples": args.num_samples,
                    }
                    for s in args.seeds
                ]
        RESULTS.mkdir(exist_ok=True)
        context = mp.get_context("spawn")  # one fresh process per run: no shared caches
        for job in jobs:
            with context.Pool(1) as pool:
                row = pool.apply(run_one, (job,))
            with ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            shown = {k: v for k, v in row.items() if k not in ("route", "trace")}
            print(json.dumps(shown), flush=True)
    render()


if __name__ == "__main__":
    main()
