"""The ``torch.func`` layer: turns the pure core into a training step with real savings."""

from .layers import LayerMap, find_layers, join_layers, split_by_layer
from .per_sample import per_sample_grads, per_sample_losses, token_losses_per_sample
from .skipping import BlockSkipper
from .step import (
    Snapshot,
    StepAux,
    apply_gradients,
    finish_step,
    flash_init_for,
    gca_after_step,
    masked_value_and_grad,
    restore_snapshot,
    take_snapshot,
    virtual_steps,
)

__all__ = [
    "LayerMap", "find_layers", "join_layers", "split_by_layer",
    "per_sample_grads", "per_sample_losses", "token_losses_per_sample",
    "BlockSkipper",
    "Snapshot", "StepAux", "apply_gradients", "finish_step", "flash_init_for", "gca_after_step",
    "masked_value_and_grad", "restore_snapshot", "take_snapshot", "virtual_steps",
]
