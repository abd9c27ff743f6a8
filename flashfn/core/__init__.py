"""The functional core: pure functions over immutable state (NamedTuples), no ``nn.Module``, no printing."""

from .alas import (
    ALASState,
    alas_init,
    alas_update,
    flatten,
    interpolate,
    layer_heat,
    reset_activity,
    should_backward,
    state_nbytes,
    unflatten,
)
from .gca import GCADecision, GCAState, gca_init, gca_reset, gca_update
from .pruning import LossMemory, memory_init, memory_update, prune_samples
from .safety import SafetyEvents, SafetyState, is_active, is_honest_step, safety_init, safety_update
from .stepback import StepBackState, is_stepped_back, step_back_messages, stepback_init, stepback_update
from .weighting import WeightingState, weigh_samples, weighted_loss, weighting_init, weighting_update

__all__ = [
    "ALASState", "alas_init", "alas_update", "interpolate", "layer_heat", "reset_activity", "should_backward",
    "state_nbytes", "flatten", "unflatten",
    "GCADecision", "GCAState", "gca_init", "gca_reset", "gca_update",
    "SafetyEvents", "SafetyState", "is_active", "is_honest_step", "safety_init", "safety_update",
    "LossMemory", "memory_init", "memory_update", "prune_samples",
    "StepBackState", "is_stepped_back", "step_back_messages", "stepback_init", "stepback_update",
    "WeightingState", "weigh_samples", "weighted_loss", "weighting_init", "weighting_update",
]
