"""Closed forms and predictions, to compare with measured flows."""

from ._linear import (
    deep_mode_rate as deep_mode_rate,
    saxe_half_rise_time as saxe_half_rise_time,
    saxe_mode as saxe_mode,
    two_layer_learning_times as two_layer_learning_times,
)
from ._cooccurrence import InverseLossFit as InverseLossFit, fit_inverse_loss as fit_inverse_loss
from ._rank_collapse import (
    key_query_limit_directions as key_query_limit_directions,
    key_query_rates as key_query_rates,
    key_query_solution as key_query_solution,
    predicted_escape_time as predicted_escape_time,
    stage1_blowup_bound as stage1_blowup_bound,
    stage1_energy_lower_bound as stage1_energy_lower_bound,
)
