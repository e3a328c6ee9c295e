"""The training-step progress bar of both training loops (tqdm).

The first call of a jitted train step compiles it, which takes minutes for the full models on a CPU;
counted as a step, it would make tqdm's rate and ETA absurd (hours for a ten-minute run). The bar
therefore says "compiling" until the first step returns and starts its clock and rate there. The rate
is the average since then (tqdm ``smoothing=0``): steps are dispatched asynchronously and counted in
bursts whenever the loop waits for metrics, which makes tqdm's default moving average swing by 4x.
"""

from __future__ import annotations

from typing import Any

COMPILING = "compiling the train step (first step; can take minutes)..."


class StepBar:
    """A tqdm bar over training steps ``initial..total`` whose rate and ETA exclude the first (compiling) step."""

    def __init__(self, *, total: int, initial: int, desc: str, **tqdm_kwargs: Any):
        from tqdm.auto import tqdm

        options = dict(unit="step", dynamic_ncols=True, smoothing=0.0,
                       bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]{postfix}")
        self.bar = tqdm(total=total, initial=initial, desc=desc, **{**options, **tqdm_kwargs})
        self.bar.set_postfix_str(COMPILING)
        self.compiling = True

    def update(self, n: int = 1) -> None:
        """Count ``n`` finished steps; after the first, time the rest from now."""
        if not self.compiling:
            self.bar.update(n)
            return
        self.compiling = False
        done = self.bar.n + n
        self.bar.bar_format = None  # tqdm's default: bar, rate and ETA
        self.bar.set_postfix_str("", refresh=False)
        self.bar.reset(total=self.bar.total)  # restarts the clock and the rate estimate at 0 steps
        self.bar.initial = self.bar.n = self.bar.last_print_n = done  # ... then counts from `done`
        self.bar.refresh()

    def set_postfix(self, **values: Any) -> None:
        if not self.compiling:  # keep "compiling" visible until the first step is counted
            self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()


def step_bar(enabled: bool, *, total: int, initial: int, desc: str, **tqdm_kwargs: Any) -> StepBar | None:
    """A :class:`StepBar`, or None when ``enabled`` is false (the loops then skip every progress call)."""
    return StepBar(total=total, initial=initial, desc=desc, **tqdm_kwargs) if enabled else None
