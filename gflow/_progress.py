"""One progress bar over flow time for a whole solve, across its segments.

diffrax's `TqdmProgressMeter` draws one bar per `diffeqsolve`, from that solve's own `t0` to
`t1`; a gflow solve is a chain of segments (one per transition, or per checkpoint), which would
draw a new bar from 0% at every transition. Here the compiled program reports the segment's
fraction done, its start time and the transition it looks for to a host-side bar over `[t0, t1]`.
"""

import threading

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int


class FlowTimeBar:
    """A tqdm bar over flow time `[t0, t1]`, advanced by the segments of one solve.

    Use as a context manager; while it is active, `SegmentMeter`s inside compiled segments
    whose `bar` is this bar's `position` report to it. `names` are the transitions' names,
    shown as the one looked for next. `position` is the bar's line (0 for a solve, 1 for
    certify's reference, which runs at the same time).
    """

    # The bar of each line, which running segments report to (behind a lock: callbacks come
    # from XLA's threads).
    _lock = threading.Lock()
    _active: "dict[int, FlowTimeBar]" = {}

    def __init__(self, t0: float, t1: float, desc: str | None = None, names=(), position: int = 0):
        self.t0, self.t1 = float(t0), float(t1)
        self.desc = desc
        self.names = tuple(names)
        self.position = int(position)
        self.t_start = self.t0
        self.label = ""
        self.bar = None

    def __enter__(self) -> "FlowTimeBar":
        import tqdm

        # The flow time and the awaited transition go in tqdm's `desc` field, placed after the
        # bar: its `postfix` field would prefix them with a comma.
        self.bar = tqdm.tqdm(
            total=100.0,
            unit="%",
            bar_format="{percentage:5.1f}%|{bar}| {desc} [{elapsed}<{remaining}]",
            position=self.position,
        )
        with FlowTimeBar._lock:
            FlowTimeBar._active[self.position] = self
        return self

    def __exit__(self, *exc) -> None:
        with FlowTimeBar._lock:
            if FlowTimeBar._active.get(self.position) is self:
                del FlowTimeBar._active[self.position]
        self.bar.close()

    def segment(self, t_start: float, label: str = "") -> None:
        """The next segment starts at flow time `t_start`, looking for `label`."""
        self.t_start = float(t_start)
        self.label = label
        self._show(self.t_start)

    def _show(self, t: float) -> None:
        span = self.t1 - self.t0
        self.bar.n = round(100.0 * min(max((t - self.t0) / span, 0.0), 1.0), 2)
        prefix = f"{self.desc}: " if self.desc else ""
        suffix = f", next {self.label}" if self.label else ""
        self.bar.set_description_str(f"{prefix}t={t:.4g}{suffix}", refresh=False)
        self.bar.refresh()

    @classmethod
    def _report(cls, fraction, t_start, index, position) -> None:
        # Called from the compiled program with the running segment's fraction done, where
        # that segment started, the index of the transition it looks for and its bar's line.
        with cls._lock:
            bar = cls._active.get(int(position))
        if bar is not None:
            index = int(index)
            bar.t_start = float(t_start)
            bar.label = bar.names[index] if index < len(bar.names) else ""
            bar._show(bar.t_start + float(fraction) * (bar.t1 - bar.t_start))


class SegmentMeter(diffrax.AbstractProgressMeter):
    """A diffrax progress meter that reports to the active `FlowTimeBar`.

    It holds no host state itself, so the compiled program does not depend on which bar is
    shown: one program serves every segment and every solve of the same structure. The engine
    sets `t_start` and `index` (arrays) for each segment it runs; `bar` (an array too) is the
    line of the bar to report to (`FlowTimeBar.position`).
    """

    refresh_steps: int = eqx.field(static=True, default=20)
    t_start: Array | None = None
    index: Array | None = None
    bar: Array = eqx.field(default_factory=lambda: np.asarray(0, dtype=np.int32))

    def at_segment(self, t_start, index) -> "SegmentMeter":
        return SegmentMeter(self.refresh_steps, t_start, index, self.bar)

    def init(self) -> Int[Array, ""]:
        return jnp.array(0)

    def step(self, state: Int[Array, ""], progress) -> Int[Array, ""]:
        # A host callback every `refresh_steps` steps keeps the overhead low.
        jax.lax.cond(
            state % self.refresh_steps == 0,
            lambda p, t, i, b: jax.debug.callback(FlowTimeBar._report, p, t, i, b),
            lambda p, t, i, b: None,
            progress,
            self.t_start,
            self.index,
            self.bar,
        )
        return state + 1

    def close(self, state: Int[Array, ""]) -> None:
        del state
