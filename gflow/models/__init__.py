"""Models gflow ships: each an equinox module with its loss and initializers."""

from ._deep_linear import (
    DeepLinear as DeepLinear,
    deep_linear_loss as deep_linear_loss,
    whitened_target as whitened_target,
)
