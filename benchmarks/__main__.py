"""Regenerate the benchmark results: ``python -m benchmarks``.

    python -m benchmarks                      # accuracy runs, then RESULTS.md and plots
    python -m benchmarks --steps 2000 --seeds 0 1 2 --workers 2
    python -m benchmarks --report             # only re-render RESULTS.md from results/
    python -m benchmarks --family             # every registered flow on a few posteriors
    python -m benchmarks --protocol svi --steps 5000   # plain SVI (the earlier study's loop)
    python -m benchmarks.cost                 # fit (compiled step) against AutoNormal
    python -m benchmarks.cost --guides --scaling  # ms/step of every guide, d = 10 ... 10,000

Accuracy rows are appended to ``results/accuracy.jsonl`` (one fresh process per run, see
``benchmarks/accuracy.py``); the report keeps the newest row per (posterior, guide, seed,
steps).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .accuracy import PROTOCOLS, VARIANTS, guide_factories, run_all
from .posteriors import POSTERIORS, require_posteriordb

RESULTS = Path(__file__).parent / "results"
FAMILY_POSTERIORS = ["funnel_d10", "eight_schools_centered", "garch11", "U3"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", nargs="*", default=None)
    parser.add_argument("--guides", nargs="*", default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--family", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="fit")
    args = parser.parse_args(argv)
    if not args.report:
        if args.family:
            from .accuracy import family_factories

            guides = args.guides or list(family_factories())
            posteriors = args.posteriors or FAMILY_POSTERIORS
        else:
            # (a guide named for one posterior's plate runs only when asked for by name)
            everyday = [g for g in guide_factories(10) if "local_plates" not in g]
            guides = args.guides or [*everyday, *VARIANTS]
            posteriors = args.posteriors or list(POSTERIORS)
        require_posteriordb(posteriors)
        jobs = [
            {
                "posterior": p,
                "guide": g,
                "seed": s,
                "steps": args.steps,
                "family": args.family,
                "protocol": args.protocol,
            }
            for p in posteriors
            for g in guides
            for s in args.seeds
        ]
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "family" if args.family else "accuracy"
        if args.protocol != "fit":  # kept apart: RESULTS.md compares guides under fit's protocol
            name += f"_{args.protocol}"
        out = RESULTS / f"{name}.jsonl"
        print(f"{len(jobs)} runs, {args.workers} at a time; appending to {out}", flush=True)

        def on_result(row):
            row = {**row, "steps_budget": args.steps}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            brief = {
                k: row.get(k)
                for k in (
                    "posterior",
                    "guide",
                    "max_dmean",
                    "max_dlogsd",
                    "k_hat",
                    "steps",
                    "error",
                )
            }
            print(json.dumps(brief), flush=True)

        run_all(jobs, args.workers, on_result)
    from .report import render

    render()


if __name__ == "__main__":
    main()
