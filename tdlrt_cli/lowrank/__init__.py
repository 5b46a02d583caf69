"""Low-rank Tucker layers and the TDLRT integrator. Imports only torch: usable in any training loop."""
from .allocation import BudgetSchedule, allocate_ranks
from .convert import ConversionRules, RankPolicy, convert_to_lowrank
from .integrator import (TDLRT, NonFiniteCore, TruncationInfo, augment, augment_basis, basis_gradients, galerkin_gradient,
                         StateStash, carry_optimizer_state, lowrank_layers, orthonormality_error, project_optimizer_state,
                         truncate, truncate_layers, truncate_to_budget)
from .rules import BudgetRule, RankRule, ToleranceRule, truncation_rank
from .layers import LowRankLayer, LowRankLinear, TuckerConv2d
from .tucker import fold, hosvd, mode_product, multi_mode_product, reconstruct, unfold

__all__ = [
    "TuckerConv2d", "LowRankLinear", "LowRankLayer", "TDLRT", "ToleranceRule", "BudgetRule", "RankRule", "NonFiniteCore", "TruncationInfo", "RankPolicy", "ConversionRules",
    "convert_to_lowrank", "BudgetSchedule", "allocate_ranks", "truncate_to_budget", "basis_gradients", "augment", "augment_basis", "galerkin_gradient", "truncate",
    "truncation_rank", "truncate_layers", "orthonormality_error", "carry_optimizer_state", "project_optimizer_state",
    "StateStash", "lowrank_layers", "hosvd", "reconstruct",
    "unfold", "fold", "mode_product", "multi_mode_product",
]
