"""Flash Mode's statistics: every figure computed from what happened in the run, and the box of the specification.

Definitions (also in ``docs/statistics.md``):

- **Effective Speedup** = ``t_full * timed_steps * (1 + virtual_steps / real_steps) / total_step_time``
  where ``t_full`` is the median wall-clock time of this run's steps on which
  every layer computed its real backward (warm-up, honest checks, steps where
  ALAS skipped nothing), and ``total_step_time`` the summed wall-clock time of
  all steps (from ``on_step_begin`` to ``on_step_end``: forward, backward,
  clipping, Flash Mode's own work, optimizer and virtual steps; not data
  loading, logging or evaluation; the first step, which pays one-time costs,
  is not timed). It estimates how much faster the run
  *stepped* than the same number of full steps would have; it counts a
  virtual step as worth a real one and says nothing about quality, which
  only a side-by-side benchmark (``flashfn bench``) can measure. ``n/a`` until
  a full step and a step are timed.
- **ALAS Savings** = the share of the model's trainable parameters x steps
  whose backward was skipped (the backward work of a block is taken as
  proportional to its parameter count).
- **ALAS measured step saving** = ``1 - mean time of steps with a skipped layer / t_full``.
- **GCA Virtual Steps** = virtual optimizer steps / real optimizer steps.
- **Sample Weight Avg** = mean of every sample weight applied (``n/a`` if none was).
- **Loss Spikes / Auto-Disables**: counted by the safety logic.
- **stepped_back**: per component (``alas``, ``weighting``, ``gca``), the
  step at which it stepped back because it was not helping (``None``: it
  did not); see :mod:`flashfn.core.stepback`. The box lists them.
- **memory_bytes**: bytes held by ALAS's gradient history and GCA's
  directions (``memory_vs_params``: as a multiple of the model's float32
  parameter bytes). GCA's rollback snapshot (a copy of the parameters and
  the optimizer state, taken only with GCA on) comes on top.
- **alas_history_bytes**: of these, the bytes of ALAS's gradient history
  alone (its three flat copies of the blocks' parameters, in
  ``FlashConfig.history_dtype``); ``alas_history_vs_params`` as a multiple of
  the model's float32 parameter bytes.
"""

from __future__ import annotations

import statistics
import unicodedata
from typing import Any, Dict, List, Optional

from ..core.alas import state_nbytes
from ..core.flash import FlashState
from ..core.stepback import COMPONENTS

__all__ = ["FlashStats", "StepTimer", "format_box"]


class StepTimer:
    """Wall-clock times of steps, split into full steps and steps with skipped layers.

    The first step of a run pays one-time costs (allocations, lazy
    initialisation) and is not recorded (``ignored`` counts it).
    """

    def __init__(self) -> None:
        self.full: List[float] = []
        self.skipping: List[float] = []
        self.ignored = 0

    def add(self, seconds: float, *, skipped_any: bool) -> None:
        """Record one step."""
        if self.ignored == 0:
            self.ignored = 1
            return
        (self.skipping if skipped_any else self.full).append(float(seconds))

    @property
    def total(self) -> float:
        """Summed time of every step."""
        return float(sum(self.full) + sum(self.skipping))

    def state_dict(self) -> Dict[str, List[float]]:
        """The recorded times."""
        return {"full": list(self.full), "skipping": list(self.skipping), "ignored": self.ignored}

    def load_state_dict(self, d: Dict[str, List[float]]) -> None:
        """Restore recorded times."""
        self.full = [float(x) for x in d.get("full", [])]
        self.skipping = [float(x) for x in d.get("skipping", [])]
        self.ignored = int(d.get("ignored", 0))


class FlashStats(dict):
    """A ``dict`` of the run's figures with :meth:`box` to print them."""

    @classmethod
    def compute(cls, state: FlashState, timer: Optional[StepTimer], total_params: int) -> FlashStats:
        """Compute every figure from the state's counters and the recorded step times."""
        c = state.counters
        steps = int(c.steps)
        virtual = int(c.virtual_steps)
        t_full = statistics.median(timer.full) if timer and timer.full else None
        total_time = timer.total if timer else 0.0
        timed = len(timer.full) + len(timer.skipping) if timer else 0
        # progress of the timed steps (virtual steps pro rata) over their time
        speedup = (t_full * timed * (steps + virtual) / max(steps, 1) / total_time) if (t_full and total_time > 0) \
            else None
        measured_saving = (1.0 - statistics.fmean(timer.skipping) / t_full) if (timer and timer.skipping and t_full) \
            else None
        w = state.weighting
        memory = state_nbytes(state.alas) + state_nbytes(state.gca)
        a = state.alas
        history = sum(x.numel() * x.element_size() for x in (*a.avg, *a.last, *a.prev))
        all_param_steps = float(total_params) * steps
        d = {
            "total_steps": steps,
            "active_steps": int(c.active_steps),
            "honest_steps": int(c.honest_steps),
            "effective_speedup": speedup,
            "median_full_step_s": t_full,
            "total_step_time_s": total_time,
            "alas_savings": float(c.skipped_param_steps) / all_param_steps if all_param_steps > 0 else 0.0,
            "alas_skipped_layer_share": int(c.skipped_layer_steps) / int(c.layer_steps) if int(c.layer_steps) else 0.0,
            "alas_measured_step_saving": measured_saving,
            "alas_mean_activity": float(state.alas.activity.mean()) if state.alas.activity.numel() else None,
            "alas_mean_fidelity": _nanmean(state.alas.fidelity),
            "gca_virtual_steps": virtual,
            "gca_virtual_share": virtual / steps if steps else 0.0,
            "gca_coherence": float(state.gca.coherence),
            "gca_rollbacks": int(state.gca.rollbacks),
            "sample_weight_avg": float(w.weight_sum) / int(w.count) if int(w.count) else None,
            "samples_weighted": int(w.count),
            "samples_down_weighted": int(w.low_count),
            "loss_spikes": int(state.safety.spikes),
            "auto_disables": int(state.safety.disables),
            "stepped_back": {k: (int(at) if int(at) >= 0 else None) for k, at in zip(COMPONENTS, state.stepback.at)},
            "nonfinite_losses": int(state.safety.nonfinite),
            "memory_bytes": memory,
            "memory_vs_params": memory / (4.0 * total_params) if total_params else None,
            "alas_history_bytes": history,
            "alas_history_vs_params": history / (4.0 * total_params) if total_params else None,
        }
        return cls(d)

    def box(self) -> str:
        """The statistics box of the specification, filled with this run's figures."""
        return format_box(self)


def _nanmean(t: Any) -> Optional[float]:
    vals = [float(x) for x in t.flatten() if float(x) == float(x)]
    return sum(vals) / len(vals) if vals else None


def _display_width(text: str) -> int:
    """Terminal columns of ``text`` (wide characters such as the emoji take two)."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


_NAMES = {"alas": "ALAS", "weighting": "Weighting", "gca": "GCA"}


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def format_box(s: Dict[str, Any], width: int = 70) -> str:
    """The specification's box with the figures of ``s``."""
    sp = s.get("effective_speedup")
    avg = s.get("sample_weight_avg")
    lines = [
        "⚡ FLASH MODE — STATISTICS",
        None,
        f"Effective Speedup: {'n/a' if sp is None else f'{sp:.2f}x'}",
        "",
        "Components:",
        f"  • ALAS Savings: {_pct(s.get('alas_savings'))}",
        f"  • GCA Virtual Steps: {_pct(s.get('gca_virtual_share'))}",
        f"  • Sample Weight Avg: {'n/a' if avg is None else f'{avg:.3f}'}",
        "",
        f"Total Steps: {s.get('total_steps', 0)}",
        f"Loss Spikes: {s.get('loss_spikes', 0)} | Auto-Disables: {s.get('auto_disables', 0)}",
    ]
    back = [f"{_NAMES[k]} @ {at}" for k, at in (s.get("stepped_back") or {}).items() if at is not None]
    if back:
        lines.append("Stepped back (not helping): " + ", ".join(back))
    out = ["╔" + "═" * width + "╗"]
    for line in lines:
        if line is None:
            out.append("╠" + "═" * width + "╣")
        else:
            out.append("║  " + line + " " * max(0, width - 2 - _display_width(line)) + "║")
    out.append("╚" + "═" * width + "╝")
    return "\n".join(out)
