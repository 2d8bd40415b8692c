"""Closed forms and predictions, to compare with measured flows."""

from ._linear import (
    deep_mode_rate as deep_mode_rate,
    saxe_half_rise_time as saxe_half_rise_time,
    saxe_mode as saxe_mode,
    two_layer_learning_times as two_layer_learning_times,
)
