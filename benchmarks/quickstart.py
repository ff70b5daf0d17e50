"""The README quickstart at seeds 0-19: is its verdict the same at every seed?

    python -m benchmarks.quickstart            # writes results/quickstart.md

Runs the README's first python block as written, with ``seed=0`` replaced by each seed, in
one process (2 threads), and records what ``infer`` returned: the final stage, whether it
passed its check, k-hat and ESS, the wall time and the worst error against the reference.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
import warnings
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
OUT = Path(__file__).parent / "results" / "quickstart.md"


def main(seeds=range(20)) -> None:
    torch.set_num_threads(2)
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert "seed=0" in code
    lines = [
        "| seed | final stage | accepted | k-hat | ESS | wall s "
        "| worst abs(Δmean)/sd (mu, tau, theta) |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        namespace: dict = {}
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(code.replace("seed=0", f"seed={seed}"), "README", "exec"), namespace)
        seconds = time.perf_counter() - start
        posterior, reference = namespace["posterior"], namespace["REFERENCE"]
        samples = posterior.samples
        worst = max(
            abs(float(samples[site].reshape(len(samples[site]), -1)[:, j].mean()) - ref[0]) / ref[1]
            for name, ref in reference.items()
            for site, j in [(name.split("[")[0], int(name[6:-1]) - 1 if "[" in name else 0)]
        )
        last = posterior.route.stages[-1]
        d = posterior.diagnostics
        lines.append(
            f"| {seed} | {last.name} | {not posterior.route.approximate} | "
            f"{d.get('k_hat', float('nan')):.2f} | {d['ess']:.0f} | {seconds:.1f} | {worst:.3f} |"
        )
        print(lines[-1], flush=True)
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
