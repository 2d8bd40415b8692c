"""One progress bar over flow time for a whole solve, across its segments.

diffrax's `TqdmProgressMeter` draws one bar per `diffeqsolve` from a host callback inside the
compiled program: every step pays a condition, every refresh a host round trip (a sync on a
GPU), and the callback's function enters JAX's compilation-cache key, so every process
recompiles. gflow's bar is drawn by the host between calls of the engine's program instead: a
solve with a bar runs in chunks of steps (which do not change its steps) of about a quarter of
a second each, and the bar moves after each.
"""


class FlowTimeBar:
    """A tqdm bar over flow time `[t0, t1]`, moved by the host between chunks of one solve.

    Use as a context manager. `names` are the transitions' names, shown as the one looked for
    next. `position` is the bar's line (0 for a solve, 1 for certify's reference, which runs
    at the same time).
    """

    def __init__(self, t0: float, t1: float, desc: str | None = None, names=(), position: int = 0):
        self.t0, self.t1 = float(t0), float(t1)
        self.desc = desc
        self.names = tuple(names)
        self.position = int(position)
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
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def segment(self, t: float, label: str = "") -> None:
        """The solve has reached flow time `t` and looks for the transition `label` next."""
        span = self.t1 - self.t0
        self.bar.n = round(100.0 * min(max((float(t) - self.t0) / span, 0.0), 1.0), 2)
        prefix = f"{self.desc}: " if self.desc else ""
        suffix = f", next {label}" if label else ""
        self.bar.set_description_str(f"{prefix}t={float(t):.4g}{suffix}", refresh=False)
        self.bar.refresh()
