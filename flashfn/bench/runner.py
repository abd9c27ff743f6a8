"""Running the benchmark: seeds x variants, alternated, and the figures computed from the raw runs.

The protocol (``docs/benchmark.md``): per workload and seed, every variant is
trained once, in an order rotated by one place per seed (seed 0: plain, flash,
alas, weighting, gca; seed 1: flash, alas, weighting, gca, plain; ...). The
**target** of a seed is plain training's best held-out loss in that seed; a
variant's **time-to-target** is the training time (evaluation excluded) at its
first evaluation whose held-out loss is at or below the target. Nothing is
extrapolated: a variant that never gets there "did not reach", with its final
gap. FLOPs are counted after the runs, outside every timed region.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import FlashConfig
from .workloads import VARIANTS, WORKLOADS, RunResult, Workload

__all__ = [
    "BenchOptions",
    "LOSSY_THRESHOLD",
    "analyse_seed",
    "build_workloads",
    "rotated",
    "run_benchmark",
    "summarise",
]

#: A variant is "lossy" when its best held-out loss is worse than plain's by more than this fraction.
LOSSY_THRESHOLD = 0.005

MODES = ("full", "quick", "smoke")
WARMUP_RUN_STEPS = 10  # steps of the untimed warm-up runs before a workload's timed runs
DEFAULT_SEEDS = {"full": 3, "quick": 1, "smoke": 1}

Echo = Callable[[str], None]


@dataclass
class BenchOptions:
    """Everything a benchmark run is configured by (the command-line options; see ``docs/benchmark.md``).

    ``None`` for ``seeds``, ``steps``, ``eval_every`` and ``lr`` means the
    mode's default (per workload for ``steps``, ``eval_every`` and ``lr``).
    """

    workloads: Tuple[str, ...] = ("shakespeare", "fashion")
    variants: Tuple[str, ...] = VARIANTS
    mode: str = "full"
    seeds: Optional[int] = None
    steps: Optional[int] = None
    eval_every: Optional[int] = None
    threads: int = 1
    out: str = "flashfn-results"
    lr: Optional[float] = None
    lr_sweep: bool = False
    sweep_steps: Optional[int] = None
    fashion_root: Optional[str] = None
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise ValueError(f"workloads must be among {tuple(WORKLOADS)}, got {self.workloads!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"variants must be among {VARIANTS}, got {self.variants!r}")
        # plain training defines the target: always run it, first in the base order
        self.variants = tuple(v for v in VARIANTS if v in set(self.variants) | {"plain"})
        for name in ("seeds", "steps", "eval_every", "sweep_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
        if self.lr is not None and not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.lr is not None and self.lr_sweep:
            raise ValueError("lr and lr_sweep exclude each other")

    @property
    def n_seeds(self) -> int:
        """Number of seeds (the mode's default when not given)."""
        return self.seeds if self.seeds is not None else DEFAULT_SEEDS[self.mode]


def rotated(items: Sequence[str], k: int) -> List[str]:
    """``items`` rotated left by ``k`` places (the variant order of the ``k``-th seed).

    Example:
        >>> rotated(["plain", "flash", "alas"], 1)
        ['flash', 'alas', 'plain']
    """
    items = list(items)
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def build_workloads(opts: BenchOptions) -> List[Workload]:
    """The selected workloads with the mode's settings and the options' overrides applied."""
    out = []
    for name in opts.workloads:
        cls, presets = WORKLOADS[name]
        changes: Dict[str, Any] = {}
        if opts.steps is not None:
            changes["steps"] = opts.steps
        if opts.eval_every is not None:
            changes["eval_every"] = opts.eval_every
        if opts.lr is not None:
            changes["lr"] = opts.lr
        if name == "fashion" and opts.fashion_root is not None:
            changes["root"] = opts.fashion_root
        settings = dataclasses.replace(presets[opts.mode], **changes)
        settings.eval_every = min(settings.eval_every, settings.steps)
        out.append(cls(settings))
    return out


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #


def _first_reach(curve: List[Dict[str, float]], target: float) -> Optional[Dict[str, float]]:
    for point in curve:
        if point["loss"] <= target:
            return point
    return None


def _flops_until(r: RunResult, n_steps: int, flops_of: Callable[[Tuple[int, ...]], int]) -> int:
    """FLOPs of the first ``n_steps`` steps of ``r`` (a pruned step counts its share of the batch)."""
    fractions = r.batch_fraction or [1.0] * len(r.patterns)
    return int(sum(flops_of(tuple(p)) * f for p, f in zip(r.patterns[:n_steps], fractions[:n_steps])))


def analyse_seed(runs: Dict[str, RunResult], flops_of: Callable[[Tuple[int, ...]], int]) -> Dict[str, Dict[str, Any]]:
    """The figures of every variant of one seed, against that seed's plain run.

    Args:
        runs: variant -> its run (``"plain"`` required).
        flops_of: FLOPs of one step given its skipped-layer pattern.

    Returns:
        variant -> figures (see ``docs/benchmark.md`` for each definition).
    """
    plain = runs["plain"]
    target = min(p["loss"] for p in plain.curve[1:] or plain.curve)
    plain_hit = _first_reach(plain.curve, target)
    assert plain_hit is not None
    plain_flops = _flops_until(plain, int(plain_hit["step"]), flops_of)
    plain_flops_run = _flops_until(plain, len(plain.patterns), flops_of)
    out = {}
    for variant, r in runs.items():
        losses = [p["loss"] for p in r.curve[1:] or r.curve]
        best = min(losses)
        best_point = min(r.curve[1:] or r.curve, key=lambda p: p["loss"])
        final = r.curve[-1]["loss"]
        hit = _first_reach(r.curve, target)
        fig: Dict[str, Any] = {
            "target": target,
            "best_loss": best,
            "best_step": int(best_point["step"]),
            "final_loss": final,
            "final_gap": final - target,
            "final_gap_rel": (final - target) / target,
            "best_vs_plain_rel": (best - target) / target,
            "lossy": bool((best - target) / target > LOSSY_THRESHOLD),
            "reached": hit is not None,
            "steps_to_target": None,
            "time_to_target_s": None,
            "speedup": None,
            "flops_to_target": None,
            "flop_ratio": None,
            "train_time_s": r.train_time,
            "step_time_ms": 1000.0 * r.train_time / max(1, r.steps),
            "flops_run": _flops_until(r, len(r.patterns), flops_of),
            "skipped_layer_share": None,
            "effective_speedup": None,
            "speedup_gap": None,
        }
        fig["flop_ratio_run"] = fig["flops_run"] / plain_flops_run if plain_flops_run else None
        if r.layer_names and r.patterns:
            fig["skipped_layer_share"] = sum(len(p) for p in r.patterns) / (len(r.patterns) * len(r.layer_names))
        if hit is not None:
            steps = int(hit["step"])
            fig["steps_to_target"] = steps
            fig["time_to_target_s"] = float(hit["time"])
            if hit["time"] > 0 and plain_hit["time"] > 0:
                fig["speedup"] = float(plain_hit["time"]) / float(hit["time"])
            fig["flops_to_target"] = _flops_until(r, steps, flops_of)
            fig["flop_ratio"] = fig["flops_to_target"] / plain_flops if plain_flops else None
        if r.flash_stats is not None:
            eff = r.flash_stats.get("effective_speedup")
            fig["effective_speedup"] = eff
            if eff is not None and fig["speedup"] is not None:
                fig["speedup_gap"] = eff - fig["speedup"]
        out[variant] = fig
    return out


def _spread(values: Sequence[Optional[float]]) -> Optional[Dict[str, Any]]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


NUMERIC_FIGURES = (
    "target", "best_loss", "final_loss", "final_gap", "final_gap_rel", "best_vs_plain_rel", "steps_to_target",
    "time_to_target_s", "speedup", "flops_to_target", "flop_ratio", "flops_run", "flop_ratio_run", "train_time_s",
    "step_time_ms", "skipped_layer_share", "effective_speedup", "speedup_gap",
)


def summarise(per_seed: Sequence[Dict[str, Dict[str, Any]]], variants: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Median and spread (min-max) over seeds of every figure, per variant.

    A figure that is undefined in a seed (e.g. the speed-up of a seed that did
    not reach the target) is left out of its median; ``reached`` counts the
    seeds that reached the target.
    """
    out = {}
    for v in variants:
        figs = [s[v] for s in per_seed if v in s]
        summary: Dict[str, Any] = {
            "seeds": len(figs),
            "reached": sum(1 for f in figs if f["reached"]),
            "lossy": sum(1 for f in figs if f["lossy"]),
        }
        for name in NUMERIC_FIGURES:
            summary[name] = _spread([f.get(name) for f in figs])
        out[v] = summary
    return out


# --------------------------------------------------------------------------- #
# Environment
# --------------------------------------------------------------------------- #


def machine_info() -> Dict[str, Any]:
    """Cores, library versions, date: what a figure needs beside it to be read."""
    info: Dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["cores_available"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        info["cores_available"] = os.cpu_count()
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    for lib in ("transformers", "accelerate"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    from .. import __version__

    info["flashfn"] = __version__
    return info


class _Bar:
    """A tqdm progress bar, or a silent stand-in."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)
            except ImportError:  # pragma: no cover - tqdm is in the bench extra
                self._bar = None

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text, refresh=True)

    def write(self, text: str, echo: Echo) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            echo(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _run_dict(r: RunResult, order: int, figures: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "seed": r.seed, "variant": r.variant, "order": order, "lr": r.lr, "steps": r.steps,
        "figures": figures, "curve": r.curve, "activity": r.activity, "layer_names": r.layer_names,
        "skipped": [list(p) for p in r.patterns], "flash_config": r.flash_config, "flash_stats": r.flash_stats,
        "box": r.box, "events": r.events, "wall_time_s": r.wall_time, "batch_fraction": r.batch_fraction,
    }


def _one_line(r: RunResult) -> str:
    best = min(p["loss"] for p in r.curve)
    return (f"  {r.workload:<11} seed {r.seed}  {r.variant:<9} held-out best {best:.4f} final "
            f"{r.curve[-1]['loss']:.4f}  train {r.train_time:7.1f} s  ({1000 * r.train_time / max(1, r.steps):.1f} "
            "ms/step)")


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #


def run_benchmark(opts: BenchOptions, echo: Echo = print) -> Dict[str, Any]:
    """Run every selected workload x seed x variant and return the results (the JSON's content).

    Args:
        opts: the options.
        echo: where progress lines go (``print`` by default).

    Returns:
        A JSON-ready dict: ``config``, ``machine``, ``command``, and per
        workload its ``settings``, ``lr``, optional ``lr_sweep``, the
        ``flops_per_step`` table, every ``run`` (raw curve, skipped layers per
        step, activity, Flash Mode's statistics, figures) and the ``summary``.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    restore = _quiet_libraries()
    started = time.perf_counter()
    try:
        workloads = build_workloads(opts)
        seeds = list(range(opts.n_seeds))
        variants = list(opts.variants)
        results: Dict[str, Any] = {
            "schema": 1,
            "command": opts.command,
            "config": {**dataclasses.asdict(opts), "seed_list": seeds},
            "machine": machine_info(),
            "workloads": {},
        }
        ready = []
        for wl in workloads:
            reason = wl.unavailable()
            if reason is not None:
                echo(f"[skip] workload {wl.name!r}: {reason}")
                results["workloads"][wl.name] = {"skipped": reason, "settings": wl.describe()}
            else:
                ready.append(wl)
        total = 0
        for wl in ready:
            s = wl.settings
            total += s.steps * len(variants) * len(seeds)
            if opts.lr_sweep:
                total += len(s.lr_grid) * (opts.sweep_steps or max(1, s.steps // 2))
        bar = _Bar(total, opts.progress)
        try:
            for wl in ready:
                results["workloads"][wl.name] = _run_workload(wl, opts, seeds, variants, bar, echo)
        finally:
            bar.close()
        results["total_wall_time_s"] = time.perf_counter() - started
        return results
    finally:
        restore()
        torch.set_num_threads(threads_before)


def _run_workload(wl: Workload, opts: BenchOptions, seeds: List[int], variants: List[str], bar: _Bar,
                  echo: Echo) -> Dict[str, Any]:
    s = wl.settings
    entry: Dict[str, Any] = {"settings": wl.describe()}
    lr = s.lr
    # An untimed, discarded warm-up of both code paths (plain, Flash Mode), so that no timed run pays the
    # process's one-off costs (lazy imports, first-use allocations); otherwise seed 0's plain run, always
    # the first, would pay them alone.
    bar.describe(f"{wl.name} warm-up")
    for variant in ("plain", "flash"):
        wl.run(variant, seeds[0], lr, steps=min(WARMUP_RUN_STEPS, s.steps))
    if opts.lr_sweep:
        sweep_steps = opts.sweep_steps or max(1, s.steps // 2)
        rows = []
        for lr_try in s.lr_grid:
            bar.describe(f"{wl.name} lr sweep {lr_try:g}")
            gc.collect()
            r = wl.run("plain", seeds[0], lr_try, steps=sweep_steps, progress=bar.update)
            rows.append({"lr": lr_try, "steps": sweep_steps, "seed": seeds[0],
                         "best_loss": min(p["loss"] for p in r.curve), "final_loss": r.curve[-1]["loss"],
                         "train_time_s": r.train_time, "curve": r.curve})
            bar.write(f"  {wl.name:<11} lr sweep  lr {lr_try:<8g} best held-out {rows[-1]['best_loss']:.4f}", echo)
        lr = min(rows, key=lambda row: row["best_loss"])["lr"]
        entry["lr_sweep"] = {"steps": sweep_steps, "seed": seeds[0], "grid": list(s.lr_grid), "runs": rows,
                             "chosen_lr": lr}
    entry["lr"] = lr
    if s.steps <= s.flash_overrides.get("warmup_steps", FlashConfig().warmup_steps):
        bar.write(f"  note: {wl.name}: {s.steps} steps <= Flash Mode's warm-up: the Flash Mode variants act as "
                  "plain training", echo)
    runs: List[Tuple[int, RunResult]] = []
    for i, seed in enumerate(seeds):
        for order, variant in enumerate(rotated(variants, i)):
            bar.describe(f"{wl.name} seed {seed} {variant}")
            gc.collect()
            r = wl.run(variant, seed, lr, progress=bar.update)
            runs.append((order, r))
            bar.write(_one_line(r), echo)
    # FLOPs: counted after every timed run, once per skipped-layer pattern seen
    patterns = sorted({tuple(p) for _, r in runs for p in r.patterns}, key=lambda p: (len(p), p))
    flops = {p: wl.step_flops(p) for p in patterns}
    n_layers = max((len(r.layer_names) for _, r in runs), default=0)
    entry["flops_per_step"] = {
        "honest": wl.step_flops(()),
        "by_pattern": [{"skipped": list(p), "flops": f} for p, f in flops.items()],
        "n_layers": n_layers,
    }
    per_seed = []
    entry["runs"] = []
    for seed in seeds:
        by_variant = {r.variant: r for _, r in runs if r.seed == seed}
        figs = analyse_seed(by_variant, wl.step_flops)
        per_seed.append(figs)
        for order, r in runs:
            if r.seed == seed:
                entry["runs"].append(_run_dict(r, order, figs[r.variant]))
    entry["summary"] = summarise(per_seed, variants)
    return entry


def _quiet_libraries() -> Callable[[], None]:
    """Silence transformers' and flashfn's per-run chatter (events are kept in the JSON); returns the undo."""
    undo: List[Callable[[], None]] = []
    try:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        undo.append(lambda: hf_logging.set_verbosity(level))
    except ImportError:  # pragma: no cover
        pass
    flog = logging.getLogger("flashfn")
    old = flog.level
    flog.setLevel(logging.ERROR)
    undo.append(lambda: flog.setLevel(old))

    def restore() -> None:
        for f in reversed(undo):
            f()

    return restore
