"""Progress display and the error of a run that hit a non-finite value, for every fit loop
(``fit`` and ``Flow.fit``)."""

from __future__ import annotations

import math
import numbers
import sys
import time

__all__ = ["FitError", "Progress", "check_setting"]


class FitError(RuntimeError):
    """Training hit a non-finite loss or gradient; ``step`` and ``site`` say where."""

    def __init__(self, message: str, step: int, site: str | None = None):
        super().__init__(message)
        self.step = step
        self.site = site


def check_setting(who: str, name: str, value, *, integer: bool = False) -> None:
    """A loop setting (a rate, a count) must be a finite positive number.

    Example:
        >>> check_setting("fit", "lr", float("inf"))
        Traceback (most recent call last):
        ...
        ValueError: fit: lr must be a finite positive number, got inf
    """
    kind = "integer" if integer else "number"
    ok = isinstance(value, numbers.Integral if integer else numbers.Real)
    if not (ok and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{who}: {name} must be a finite positive {kind}, got {value!r}")


class Progress:
    """A tqdm bar on an interactive stderr, else a plain line every tenth of the run."""

    def __init__(self, progress, num_steps, label="ELBO", sign=-1.0):
        if progress not in (True, False, "bar", "log"):
            raise ValueError(f"progress must be True, False, 'bar' or 'log', got {progress!r}")
        self.mode = None
        if progress == "bar" or (progress is True and sys.stderr.isatty()):
            from tqdm.auto import tqdm

            self.mode = "bar"
            self.bar = tqdm(total=num_steps, file=sys.stderr, dynamic_ncols=True, leave=True)
        elif progress:
            self.mode = "log"
        self.num_steps = num_steps
        self.label, self.sign = label, sign
        self.every = max(1, num_steps // 10)
        self.start = time.perf_counter()

    def update(self, step, smoothed):
        if self.mode == "bar":
            self.bar.update(1)
            if step % 50 == 0 or step == 1:
                self.bar.set_postfix_str(f"{self.label} {self.sign * smoothed:.4g}", refresh=False)
        elif self.mode == "log" and step % self.every == 0:
            elapsed = time.perf_counter() - self.start
            print(
                f"fit: step {step}/{self.num_steps}  {self.label} {self.sign * smoothed:.4g}"
                f"  ({elapsed:.1f} s)",
                file=sys.stderr,
            )

    def note(self, text: str) -> None:
        """A line of its own (above the bar), e.g. what the setup did and how long it took."""
        if self.mode == "bar":
            self.bar.write(f"fit: {text}", file=sys.stderr)
        elif self.mode == "log":
            print(f"fit: {text}", file=sys.stderr)

    def close(self):
        if self.mode == "bar":
            self.bar.close()
            self.mode = "closed"

    def finish(self, result):
        if self.mode is not None:
            print(f"fit: {result.summary()}", file=sys.stderr)
