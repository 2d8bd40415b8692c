"""`ScalingLaw`: how theory says a transition's time scales with the init scale `eps`.

The init-scale convention, used by every preset, sweep and example: `eps` scales every
trainable weight (entries `N(0, eps²)`, or an init multiplied by `eps`, see
`gflow.presets.scaled_init`). A model whose output is a product of `k` weight factors near the
origin then starts at order `eps^k`, and its escape from the small-init plateau takes

- `T ≈ a + b ln(1/eps)` for `k = 2` (the leading-order flow is linear: modes grow
    exponentially; e.g. a two-layer linear network, `b = 1/s` for a mode of strength `s`, since
    the mode starts at `u0 ∝ eps²` and Saxe's half-rise is `ln(s/u0 − 1)/(2s)`);
- `T ∝ eps^{−(k−2)}` for `k ≥ 3` (a finite-time blow-up of the reduced flow; three factors:
    `1/eps`).
"""

import math

import equinox as eqx


class ScalingLaw(eqx.Module):
    """A transition time's law in the init scale `eps`, as theory gives it.

    Build one with `ScalingLaw.log` or `ScalingLaw.power`.

    **Fields:**

    - `law`: `"log"` (`T = a + slope · ln(1/eps)`) or `"power"` (`T = A · eps^slope`).
    - `slope`: the theory's slope (for a power law, its exponent).
    - `basis`: one line: where the slope comes from and how accurate it is.
    """

    law: str
    slope: float
    basis: str = ""

    def __check_init__(self):
        if self.law not in ("log", "power"):
            raise ValueError(f"ScalingLaw.law must be 'log' or 'power', got {self.law!r}")
        if not math.isfinite(self.slope):
            raise ValueError(f"ScalingLaw.slope must be finite, got {self.slope}")

    @classmethod
    def log(cls, slope: float, *, basis: str = "") -> "ScalingLaw":
        """`T = a + slope · ln(1/eps)`: a linear leading-order flow (two factors)."""
        return cls("log", float(slope), basis)

    @classmethod
    def power(cls, exponent: float, *, basis: str = "") -> "ScalingLaw":
        """`T ∝ eps^exponent`: `exponent = −(k − 2)` for `k ≥ 3` factors."""
        return cls("power", float(exponent), basis)

    @classmethod
    def of_factors(cls, k: int, *, rate: float | None = None, basis: str = "") -> "ScalingLaw":
        """The escape law of a model that is a product of `k >= 2` weight factors near the
        origin: log with slope `1/rate` for `k = 2` (`rate` the exponent of the per-weight
        growth `e^{rate t}`, required), power with exponent `−(k − 2)` for `k ≥ 3`."""
        if int(k) != k or k < 2:
            raise ValueError(f"a product of k >= 2 factors is needed, got k={k}")
        if k == 2:
            if rate is None or not rate > 0:
                raise ValueError("k = 2 (a log law) needs the growth rate of the weights")
            return cls.log(1.0 / rate, basis=basis)
        return cls.power(-(k - 2.0), basis=basis)
