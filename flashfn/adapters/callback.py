"""``FlashModeCallback``: Flash Mode acting on a ``transformers`` Trainer run, given only through ``callbacks=[...]``.

What it does to the run (each step is planned by :func:`flashfn.core.flash.plan_step`
and folded in by :func:`flashfn.core.flash.flash_update`; this class holds the
state and the hooks, nothing more):

- ``on_train_begin``: finds the ALAS layers (:func:`flashfn.func.find_layers`),
  installs a :class:`flashfn.func.BlockSkipper`, wraps ``model.forward`` to
  record the loss and, for the supported heads, apply sample weights.
- ``on_step_begin``: plans the step and sets the skipped layers (their
  backward is really not done on any micro-batch of the step).
- ``on_pre_optimizer_step`` (after the Trainer's clipping): reads the real
  gradients, fills skipped layers with ALAS's predictions, and clips the
  completed gradient to ``max_grad_norm`` again, so no injected gradient
  escapes the run's clipping. Under data parallelism the step's losses and
  sample weights are first gathered from every process, so every process
  takes the same decisions (DDP must find unused parameters when ALAS is on).
- ``on_optimizer_step``: GCA's rollback, checkpoint and virtual steps, through
  the inner optimizer, only when the real step was not skipped by a gradient
  scaler; the learning-rate schedule is never advanced by a virtual step.
- ``on_step_end``: clears the skip set, records the step time, logs the
  figures every ``log_every`` steps through ``Trainer.log`` (so ``report_to``
  integrations see them).
- ``on_train_end``: removes every hook and prints the statistics box when ``verbose``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional

import optree
import torch
from torch import nn

from ..config import FlashConfig
from ..core.flash import FlashState, StepPlan, component_on, flash_init, flash_update, plan_step, uses_history
from ..core.gca import GCADecision
from ..core.stepback import step_back_messages
from ..core.weighting import weigh_samples
from ..func.hf_losses import head_kind, honours_num_items, per_sample_head_terms, weighted_head_loss
from ..func.layers import LayerMap, find_layers
from ..func.skipping import BlockSkipper
from ..func.step import Snapshot, first_moments, gca_after_step
from .stats import FlashStats, StepTimer

try:  # transformers is an optional extra: the class still imports without it, but cannot be used with a Trainer
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - exercised only without the extra
    TrainerCallback = object  # type: ignore[misc,assignment]

logger = logging.getLogger("flashfn")

STATE_FILE = "flash_mode_state.pt"
STATE_FORMAT = 2  # 2: the state carries which components stepped back

__all__ = ["FlashModeCallback"]


def _find_trainer() -> Any:
    """The ``Trainer`` that is calling us (found on the call stack), or ``None``."""
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover
        return None
    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


def _resume_dir(args: Any, state: Any) -> Optional[str]:
    """The checkpoint folder the Trainer is resuming from.

    ``Trainer.train(resume_from_checkpoint=...)`` keeps it in a local variable
    of the calling frames; otherwise the Trainer's own naming is used.
    """
    frame = inspect.currentframe()
    while frame is not None:
        value = frame.f_locals.get("resume_from_checkpoint")
        if isinstance(value, str) and os.path.isdir(value):
            return value
        frame = frame.f_back
    folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    return folder if os.path.isdir(folder) else None


class FlashModeCallback(TrainerCallback):
    """Flash Mode for the ``transformers`` Trainer.

    Args:
        config: the configuration (``FlashConfig()`` when ``None``).
        verbose: print the statistics box at the end of training (and log
            decisions). ``config.verbose`` is honoured too: both must be true.

    Example:
        >>> from flashfn import FlashConfig, FlashModeCallback
        >>> cb = FlashModeCallback(FlashConfig(warmup_steps=10))
        >>> cb.config.warmup_steps
        10
    """

    def __init__(self, config: Optional[FlashConfig] = None, verbose: bool = True) -> None:
        if config is None:
            config = FlashConfig()
        if not isinstance(config, FlashConfig):
            raise TypeError(f"FlashModeCallback: config must be a FlashConfig, got {type(config).__name__}")
        if not isinstance(verbose, bool):
            raise TypeError(f"FlashModeCallback: verbose must be a bool, got {verbose!r}")
        self.config = config
        self.verbose = verbose and config.verbose
        self.state: Optional[FlashState] = None
        self.stats: Optional[FlashStats] = None
        self.timer = StepTimer()
        self.lmap: Optional[LayerMap] = None
        self.events: List[str] = []
        self._model: Optional[nn.Module] = None
        self._trainer: Any = None
        self._skipper: Optional[BlockSkipper] = None
        self._orig_forward: Any = None
        self._kind: Optional[str] = None
        self._weighting_on = False
        self._honours_n_items: Optional[bool] = None
        self._plan: Optional[StepPlan] = None
        self._decision = GCADecision(False, 0, False, False)
        self._snapshot: Optional[Snapshot] = None
        self._step_losses: List[torch.Tensor] = []
        self._step_weights: List[torch.Tensor] = []
        self._t0 = 0.0
        self._params: Dict[str, nn.Parameter] = {}
        self._total_params = 0
        self._alas_on = config.enable_alas
        self._gca_on = config.enable_gca
        self._max_grad_norm = 0.0
        self._no_moment = False

    # ------------------------------------------------------------------ set-up
    def _log(self, msg: str, *args: Any, warn: bool = False) -> None:
        self.events.append(msg % args if args else msg)
        (logger.warning if warn else logger.info)(msg, *args)

    def _check_setup(self, args: Any) -> None:
        trainer = self._trainer
        if (getattr(args, "deepspeed", None) or getattr(args, "fsdp", None)
                or getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)):
            raise RuntimeError(
                "Flash Mode does not support DeepSpeed or FSDP: their sharded gradients and optimizer states cannot "
                "be read, predicted or restored by the callback. Remove FlashModeCallback or train without them."
            )
        ddp = getattr(trainer, "model_wrapped", None)
        if self._alas_on and isinstance(ddp, nn.parallel.DistributedDataParallel) and (
                not ddp.find_unused_parameters or getattr(ddp, "static_graph", False)):
            raise RuntimeError(
                "Flash Mode's ALAS skips the backward of whole blocks, so on a skipped step their parameters get no "
                "gradient on every process; DistributedDataParallel must then be built with "
                "find_unused_parameters=True and without static_graph. Set TrainingArguments("
                "ddp_find_unused_parameters=True, ddp_static_graph=False), or FlashConfig(enable_alas=False)."
            )

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any):
        if model is None:
            raise RuntimeError("FlashModeCallback needs the Trainer's model (got none in on_train_begin)")
        if self._model is not None:
            self._teardown()
        self._trainer = _find_trainer()
        self._check_setup(args)
        cfg = self.config
        self._model = model
        self._max_grad_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._total_params = sum(p.numel() for p in self._params.values())
        lmap = find_layers(model, cfg.layers)
        lmap = LayerMap(lmap.names, tuple(tuple(n for n in names if n in self._params) for names in lmap.params),
                        tuple(n for n in lmap.others if n in self._params))
        if self._alas_on and len(lmap) == 0:
            self._log("Flash Mode: no repeated blocks found in %s: ALAS has nothing to skip and is off. Pass "
                      "FlashConfig(layers=[...]) to name them.", type(model).__name__, warn=True)
            self._alas_on = False
        self.lmap = lmap
        if self._alas_on:
            self._skipper = BlockSkipper(model, lmap, cfg.alas_mechanism)
        max_steps = getattr(state, "max_steps", 0) or getattr(args, "max_steps", 0)  # the state's counts epochs too
        if cfg.warmup_steps >= max_steps > 0:
            self._log("Flash Mode: max_steps=%d <= warmup_steps=%d: the whole run is warm-up, Flash Mode never acts "
                      "(plain training).", max_steps, cfg.warmup_steps, warn=True)
        self._kind = head_kind(model)
        self._weighting_on = cfg.enable_sample_weighting
        if cfg.prune_ratio > 0:
            self._log("Flash Mode: prune_ratio=%s is not used with the Trainer: pruning needs the identity of each "
                      "sample, which the callback does not see (a torch.func loop can prune, see "
                      "flashfn.core.pruning).", cfg.prune_ratio, warn=True)
        if self._weighting_on and self._kind is None:
            self._log("Flash Mode: sample weighting is off: the loss of %s cannot be split per sample "
                      "(supported: causal LM, masked LM, sequence and token classification).",
                      type(model).__name__, warn=True)
            self._weighting_on = False
        self._wrap_trainer_loss()
        self._wrap_forward(model)
        self._effective = cfg.replace(enable_alas=self._alas_on, enable_gca=self._gca_on,
                                      enable_sample_weighting=self._weighting_on)
        if self.state is None:  # a second train() call on this callback continues its state
            layer_params = tuple(tuple(self._params[n].detach() for n in names) for names in lmap.params)
            others = tuple(self._params[n].detach() for n in lmap.others)
            self.state = flash_init(layer_params, others, with_gca=self._gca_on, history_dtype=cfg.history_dtype,
                                    history=uses_history(cfg))
            if getattr(state, "global_step", 0) > 0:  # the Trainer resumed from a checkpoint
                self._resume(_resume_dir(args, state))

    # ------------------------------------------------------------------ checkpoints
    def _identity(self) -> Dict[str, Any]:
        """What a saved state must match to be reused: the config (less logging) and the layers."""
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in ("verbose", "log_every")}
        return {"config": cfg, "layers": list(self.lmap.names),
                "effective": [self._alas_on, self._gca_on, self._weighting_on]}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any):
        """Write Flash Mode's state into the checkpoint the Trainer has just saved."""
        if self.state is None or not getattr(state, "is_world_process_zero", True):
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            self._log("Flash Mode: checkpoint folder %s not found; its state was not saved.", folder, warn=True)
            return
        snap = None if self._snapshot is None else {"params": self._snapshot.params,
                                                     "optimizer": self._snapshot.optimizer}
        payload = {"format": STATE_FORMAT, **self._identity(), "leaves": optree.tree_leaves(self.state),
                   "timer": self.timer.state_dict(), "snapshot": snap, "honours_n_items": self._honours_n_items}
        torch.save(payload, os.path.join(folder, STATE_FILE))

    def _resume(self, folder: Optional[str]) -> None:
        path = os.path.join(folder, STATE_FILE) if folder else None
        if path is None or not os.path.isfile(path):
            self._log("Flash Mode: resuming from %s, which holds no Flash Mode state (saved before Flash Mode was "
                      "added?): starting Flash Mode afresh.", folder, warn=True)
            return
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            raise RuntimeError(f"Flash Mode: the state in {path} is unreadable ({err}); delete it to start Flash "
                               "Mode afresh, or resume from another checkpoint") from err
        if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else None
            raise RuntimeError(f"Flash Mode: {path} is not a Flash Mode state of format {STATE_FORMAT} (found format "
                               f"{found!r}, e.g. saved by another flashfn version); delete it to start Flash Mode "
                               "afresh, or resume with the flashfn version that saved it")
        mine = self._identity()
        for key in ("config", "layers", "effective"):
            if payload.get(key) != mine[key]:
                raise ValueError(f"Flash Mode: the state in {path} was saved with a different {key} "
                                 f"({payload.get(key)!r}, now {mine[key]!r}); it cannot be reused. Resume with the "
                                 "same model and FlashConfig, or delete the file to start Flash Mode afresh.")
        fresh, spec = optree.tree_flatten(self.state)
        leaves = payload["leaves"]
        if len(leaves) != len(fresh) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(leaves, fresh)):
            raise ValueError(f"Flash Mode: the state in {path} does not fit this model's parameters")
        self.state = optree.tree_unflatten(spec, leaves)
        self.timer.load_state_dict(payload.get("timer", {}))
        snap = payload.get("snapshot")
        self._snapshot = None if snap is None else Snapshot(snap["params"], snap["optimizer"])
        self._honours_n_items = payload.get("honours_n_items")
        self._log("Flash Mode: state restored from %s (step %d)", path, int(self.state.step))

    def _wrap_forward(self, model: nn.Module) -> None:
        orig = model.forward
        self._orig_forward = orig
        cb = self

        @functools.wraps(orig)
        def forward(*args: Any, **kwargs: Any) -> Any:
            labels = kwargs.get("labels")
            plan = cb._plan
            if labels is None or plan is None or not plan.weigh or not model.training:
                out = orig(*args, **kwargs)
                if model.training and isinstance(out, dict):
                    cb._record_loss(out, labels)
                return out
            kw = dict(kwargs)
            kw.pop("labels")
            n_items = kw.pop("num_items_in_batch", None)
            if n_items is not None and cb._honours_n_items is None:
                probe_kwargs = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
                cb._honours_n_items = honours_num_items(model, cb._kind, args, probe_kwargs, n_items, forward=orig)
                if cb._honours_n_items is None:
                    return cb._weighting_off("the loss of %s is not normalised like its head's standard loss",
                                             type(model).__name__, plan, forward, args, kwargs)
            if not cb._honours_n_items:
                n_items = None  # the model's own loss divides by its own count
            out = orig(*args, **kw)
            if not isinstance(out, dict) or out.get("logits") is None:
                return cb._weighting_off("%s did not return logits in a dict output", type(model).__name__,
                                         plan, forward, args, kwargs)
            cfg = cb.config

            def weights_fn(losses: torch.Tensor) -> torch.Tensor:
                return weigh_samples(losses, min_weight=cfg.min_sample_weight,
                                     low_loss_threshold=cfg.low_loss_threshold)

            loss, per_sample, w = weighted_head_loss(cb._kind, out["logits"], labels, weights_fn, n_items)
            cb._step_losses.append(per_sample.float().flatten() if per_sample.numel() else loss.detach().reshape(1))
            if w is not None:
                cb._step_weights.append(w.detach())
            out["loss"] = loss
            return out

        model.forward = forward

    def _record_loss(self, out: dict, labels: Optional[torch.Tensor]) -> None:
        """Record the per-sample (unweighted) losses of a micro-batch, as the weighted path does.

        The model's own loss is divided by the Trainer's ``num_items_in_batch``
        (summed over micro-batches and processes), so it is not on the same
        scale as a per-sample mean; the loss Flash Mode watches must be.
        """
        loss, logits = out.get("loss"), out.get("logits")
        if loss is None:
            return
        if self._kind is not None and labels is not None and isinstance(logits, torch.Tensor):
            with torch.no_grad():
                sums, counts = per_sample_head_terms(self._kind, logits.detach(), labels)
            if sums.numel():
                self._step_losses.append((sums / counts.clamp_min(1)).float().flatten())
                return
        self._step_losses.append(loss.detach().float().reshape(1))

    def _weighting_off(self, why: str, name: str, plan: StepPlan, forward: Any, args: tuple, kwargs: dict) -> Any:
        """Turn sample weighting off for the rest of the run (logged once) and run the plain forward."""
        self._log("Flash Mode: sample weighting is off: " + why + ".", name, warn=True)
        self._weighting_on = False
        self._effective = self._effective.replace(enable_sample_weighting=False)
        self._plan = plan._replace(weigh=False)
        return forward(*args, **kwargs)

    def _wrap_trainer_loss(self) -> None:
        """With label smoothing or a ``compute_loss_func`` the Trainer computes the loss, not the model.

        The model then gets no labels and returns no loss: sample weighting is
        turned off (logged) and the loss Flash Mode watches (spikes, GCA's
        rollback) is the one ``Trainer.compute_loss`` returns.
        """
        trainer = self._trainer
        if trainer is None or (getattr(trainer, "label_smoother", None) is None
                               and getattr(trainer, "compute_loss_func", None) is None):
            return
        if self._weighting_on:
            self._log("Flash Mode: sample weighting is off: the Trainer computes the loss outside the model (label "
                      "smoothing or compute_loss_func), so it cannot be split per sample.", warn=True)
            self._weighting_on = False
        orig = trainer.compute_loss
        cb = self

        @functools.wraps(orig)
        def compute_loss(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            res = orig(model, *args, **kwargs)
            loss = res[0] if isinstance(res, tuple) else res
            if model.training and isinstance(loss, torch.Tensor):
                cb._step_losses.append(loss.detach().float().reshape(1))
            return res

        trainer.compute_loss = compute_loss

    def _teardown(self) -> None:
        if self._trainer is not None and "compute_loss" in vars(self._trainer):
            del self._trainer.compute_loss  # the instance attribute set by _wrap_trainer_loss
        if self._skipper is not None:
            self._skipper.remove()
            self._skipper = None
        if self._model is not None and self._orig_forward is not None:
            try:
                del self._model.forward  # the instance attribute; the class's forward shows again
            except AttributeError:
                pass
        self._orig_forward = None
        self._model = None

    # ------------------------------------------------------------------ per step
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.state is None:
            return
        self._plan = plan_step(self.state, self._effective)
        self._step_losses, self._step_weights = [], []
        if self._skipper is not None:
            self._skipper.set(self._plan.skipped)
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any):
        if self.state is None or self._plan is None:
            return
        _unscale(optimizer)
        lmap, params, plan = self.lmap, self._params, self._plan
        layer_grads = tuple(
            tuple(_grad_or_zeros(params[n]) for n in names) if bool(plan.compute[i]) else None
            for i, names in enumerate(lmap.params))
        layer_params = tuple(tuple(params[n].detach() for n in names) for names in lmap.params)
        gca_on = self._gca_on and component_on(self.state, self._effective, "gca")
        other_grads = tuple(_grad_or_zeros(params[n]) for n in lmap.others) if gca_on else None
        loss, weights = self._shared_loss_and_weights()
        # the optimizer keys its state by the Parameter objects themselves (not by detached views)
        predicted = (first_moments(optimizer, tuple(tuple(params[n] for n in names) for names in lmap.params))
                     if self.config.predictor == "momentum" and component_on(self.state, self._effective, "alas")
                     else None)
        if predicted and int(self.state.step) > 0 and all(m is None for m in predicted) and not self._no_moment:
            self._no_moment = True
            self._log("Flash Mode: predictor='momentum' but %s keeps no first moment (exp_avg, momentum_buffer): "
                      "ALAS measures no fidelity and skips nothing. Use FlashConfig(predictor='ema') with this "
                      "optimizer.", type(getattr(optimizer, "optimizer", optimizer)).__name__, warn=True)
        before = self.state.stepback
        self.state, preds, self._decision = flash_update(self.state, self._effective, plan, layer_grads,
                                                         layer_params, loss, other_grads=other_grads, weights=weights,
                                                         predicted=predicted)
        for msg in step_back_messages(before, self.state.stepback, self.config):
            self._log(msg, warn=True)
        injected = []
        for i, pred in enumerate(preds):
            if pred is None:
                continue
            for n, g in zip(lmap.params[i], pred):
                params[n].grad = g.to(params[n].dtype)
                injected.append(params[n])
        if injected and self._max_grad_norm > 0:
            grads = [p.grad for p in params.values() if p.grad is not None]
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if float(total) > self._max_grad_norm:
                scale = self._max_grad_norm / (float(total) + 1e-6)
                for g in grads:
                    g.mul_(scale)

    def _shared_loss_and_weights(self) -> tuple:
        """The step's mean per-sample loss and the sample weights applied, over every process.

        Under data parallelism each process sees its own samples; what Flash
        Mode decides from them (loss spikes, GCA's rollback, the weight
        statistics) must be the same everywhere, so every process gathers every
        process's losses and weights and folds them in rank order.
        """
        losses = torch.cat(self._step_losses).double() if self._step_losses else torch.zeros(0, dtype=torch.float64)
        weights = torch.cat([w.flatten() for w in self._step_weights]) if self._step_weights else None
        if _world_size() > 1:
            mine = (float(losses.sum()), losses.numel(), None if weights is None else weights.detach().cpu())
            gathered: List[Any] = [None] * _world_size()
            torch.distributed.all_gather_object(gathered, mine)
            total = sum(s for s, _, _ in gathered)  # rank order: the same float on every process
            count = sum(c for _, c, _ in gathered)
            loss = torch.tensor(total / count if count else float("nan"), dtype=torch.float64)
            ws = [w for _, _, w in gathered if w is not None]
            return loss, (torch.cat(ws) if ws else None)
        loss = losses.mean() if losses.numel() else torch.tensor(float("nan"))
        return loss, weights

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any):
        dec = self._decision
        self._decision = GCADecision(False, 0, False, False)
        if not self._gca_on or optimizer is None:
            return
        if self.state is not None and not component_on(self.state, self._effective, "gca"):
            self._snapshot = None  # GCA stepped back: its rollback copy is neither kept nor saved
            return
        if getattr(optimizer, "step_was_skipped", False):
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        if dec.rollback and self._snapshot is not None:  # the Trainer counts this step after this hook
            self._log("Flash Mode: GCA rollback at step %d (loss rose after virtual steps)", state.global_step + 1)
        self._snapshot = gca_after_step(dec, self._params, inner, self._snapshot)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.state is None or self._plan is None:
            return
        if self._skipper is not None:
            self._skipper.clear()
        self.timer.add(time.perf_counter() - self._t0, skipped_any=bool(self._plan.skipped))
        self._plan = None
        if int(self.state.step) % self.config.log_every == 0:
            self.stats = FlashStats.compute(self.state, self.timer, self._total_params)
            logs = {f"flash/{k}": v for k, v in self.stats.items() if isinstance(v, (int, float)) and v is not None
                    and not (isinstance(v, float) and math.isnan(v))}
            if self._trainer is not None:
                self._trainer.log(logs)
            else:
                state.log_history.append({**logs, "step": state.global_step})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.state is not None:
            self.stats = FlashStats.compute(self.state, self.timer, self._total_params)
            if self.verbose:
                print(self.stats.box())
        self._teardown()

    # ------------------------------------------------------------------ public
    def get_stats(self) -> FlashStats:
        """The run's figures now (see :mod:`flashfn.adapters.stats` for their definitions)."""
        if self.state is None:
            raise RuntimeError("FlashModeCallback.get_stats: training has not started")
        return FlashStats.compute(self.state, self.timer, self._total_params)

    @property
    def skipped_layers(self) -> tuple:
        """Module paths of the layers whose backward is skipped on the current step (empty between steps)."""
        if self.lmap is None or self._plan is None:
            return ()
        return tuple(self.lmap.names[i] for i in self._plan.skipped)

    def should_compute_backward(self, layer_name: str) -> bool:
        """Whether the layer holding ``layer_name`` (a parameter name or block path) computes its backward this step."""
        if self.lmap is None:
            raise RuntimeError("FlashModeCallback.should_compute_backward: training has not started")
        i = self.lmap.layer_of(layer_name)
        if i is None or self._plan is None:
            return True
        return bool(self._plan.compute[i])


def _world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when it is not set up)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad.detach() if p.grad is not None else torch.zeros_like(p)


def _unscale(optimizer: Any) -> None:
    """Unscale fp16 gradients now if the Trainer did not (no clipping): the history must be in true units."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return
    try:
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
    except RuntimeError:  # already unscaled by the Trainer's clipping
        pass
