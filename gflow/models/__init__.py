"""Models gflow ships: each an equinox module with its loss and initializers."""

from ._deep_linear import (
    DeepLinear as DeepLinear,
    deep_linear_loss as deep_linear_loss,
    whitened_target as whitened_target,
)
from ._cooccurrence import (
    CooccurrenceTransformer as CooccurrenceTransformer,
    logistic_loss as cooccurrence_loss,
    margins as cooccurrence_margins,
    per_sample_loss as cooccurrence_per_sample_loss,
)
from ._attention import (
    AttentionFFN as AttentionFFN,
    SequenceData as SequenceData,
    exponential_loss as exponential_loss,
    logistic_loss as logistic_loss,
)
from ._reduced import (
    KeyQueryParameters as KeyQueryParameters,
    OuterParameters as OuterParameters,
    real_time as real_time,
    rescaled_time as rescaled_time,
    stage1_flow as stage1_flow,
    stage1_invariants as stage1_invariants,
    stage1_loss as stage1_loss,
    stage2_flow as stage2_flow,
    stage2_loss as stage2_loss,
    stage2_matrix as stage2_matrix,
    target_direction as target_direction,
)
from ._factorization import (
    LowRankFactorization as LowRankFactorization,
    SymmetricFactorization as SymmetricFactorization,
    factorization_loss as factorization_loss,
    scaled_preconditioner as scaled_preconditioner,
)
from ._decoder import (
    Decoder as Decoder,
    TokenData as TokenData,
    accuracy as decoder_accuracy,
    cross_entropy as decoder_cross_entropy,
)
