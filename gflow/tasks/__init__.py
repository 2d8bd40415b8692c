"""Data of the papers' tasks, and the observables their figures show."""

from ._cooccurrence import CooccurrenceData as CooccurrenceData, cooccurrence as cooccurrence
from ._cooccurrence_observers import (
    Margin as Margin,
    ScoreMatrix as ScoreMatrix,
    TotalLoss as TotalLoss,
    TypeLosses as TypeLosses,
    WordReadouts as WordReadouts,
    cooccurrence_observers as cooccurrence_observers,
    phase1_condition as phase1_condition,
)
from ._rank_collapse import (
    condensed_stage2_matrix as condensed_stage2_matrix,
    rank_collapse_task as rank_collapse_task,
)
from ._anchor import AnchorData as AnchorData, anchor_task as anchor_task
from ._text import text_task as text_task
from ._anchor_function import (
    AnchorFunctionData as AnchorFunctionData,
    anchor_function as anchor_function,
    anchor_shift as anchor_shift,
)
