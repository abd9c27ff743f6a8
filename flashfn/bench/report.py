"""Printing and saving the results of ``flashfn bench``: the tables, Flash Mode's box, ``results.json`` and the figure.

Every figure printed here is read from the results dict built by
:func:`flashfn.bench.runner.run_benchmark`; nothing is computed twice and
nothing is a constant. A cell shows the median over seeds and, with more than
one seed, the spread ``[min..max]``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["CLAIMS", "format_report", "format_table", "format_ablation", "format_boxes", "format_gap",
           "write_json", "write_figure", "sanitise"]

#: The specification's contribution table (claims, printed beside the measured numbers, never used as figures).
CLAIMS = (
    ("alas", "ALAS", "15-25%"),
    ("weighting", "Sample Weighting", "5-10%"),
    ("gca", "Conservative GCA", "3-5%"),
    ("flash", "Total (all together)", "1.3-1.5x"),
)

COLORS = {"plain": "black", "flash": "tab:red", "alas": "tab:blue", "weighting": "tab:green", "gca": "tab:orange"}


def _num(x: Optional[float], fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def spread(sp: Optional[Dict[str, Any]], fmt: str = ".3f", suffix: str = "") -> str:
    """``median [min..max]`` (just the median when the spread is a single value), or ``n/a``."""
    if not sp:
        return "n/a"
    med = format(sp["median"], fmt) + suffix
    lo, hi = format(sp["min"], fmt), format(sp["max"], fmt)
    if sp["n"] > 1 and lo != hi:
        return f"{med} [{lo}..{hi}]"
    return med


def _pct(sp: Optional[Dict[str, Any]]) -> str:
    if not sp:
        return "n/a"
    scaled = {k: (100.0 * v if k in ("median", "min", "max") else v) for k, v in sp.items()}
    return spread(scaled, "+.1f", "%")


def _grid(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def _ran(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {name: w for name, w in results.get("workloads", {}).items() if "summary" in w}


def _speedup_cell(v: str, s: Dict[str, Any]) -> str:
    if v == "plain":
        return "1.00x (ref)"
    n, k = s["seeds"], s["reached"]
    if k == 0:
        return "did not reach"
    cell = spread(s["speedup"], ".2f", "x")
    return cell if k == n else f"{cell} ({k}/{n} reached)"


def _ttt_cell(s: Dict[str, Any]) -> str:
    n, k = s["seeds"], s["reached"]
    if k == 0:
        return "did not reach"
    cell = spread(s["time_to_target_s"], ".1f")
    return cell if k == n else f"{cell} ({k}/{n})"


def format_table(results: Dict[str, Any]) -> str:
    """The main table: per workload and variant, time-to-target, speed-up, held-out losses, lossy flag, FLOP ratio."""
    header = ("workload", "variant", "time-to-target s", "speed-up", "final gap to target", "best held-out",
              "final held-out", "lossy", "FLOP ratio")
    rows = []
    for name, w in _ran(results).items():
        for v, s in w["summary"].items():
            lossy = "no" if s["lossy"] == 0 else ("yes" if s["lossy"] == s["seeds"] else f"{s['lossy']}/{s['seeds']}")
            rows.append((name, v, _ttt_cell(s), _speedup_cell(v, s), _pct(s["final_gap_rel"]),
                         spread(s["best_loss"], ".4f"), spread(s["final_loss"], ".4f"), lossy,
                         spread(s["flop_ratio"], ".3f")))
    if not rows:
        return "(no workload ran)"
    note = ("speed-up = plain time-to-target / variant time-to-target (never extrapolated); final gap = (final "
            "held-out - target) / target;\nlossy = best held-out worse than plain's by > 0.5%; FLOP ratio = "
            "variant / plain FLOPs (FlopCounterMode) spent to reach the target")
    return _grid(header, rows) + "\n" + note


def format_ablation(results: Dict[str, Any]) -> str:
    """The specification's contribution table with the measured numbers beside the claims."""
    header = ("workload", "component", "claimed", "measured speed-up", "contribution", "FLOP ratio to target",
              "FLOP ratio whole run", "best held-out vs plain", "ms/step")
    rows = []
    for name, w in _ran(results).items():
        summ = w["summary"]
        if "plain" in summ:
            p = summ["plain"]
            rows.append((name, "plain training", "-", "1.00x", "-", "1.000", "1.000", "-",
                         spread(p["step_time_ms"], ".1f")))
        for key, label, claim in CLAIMS:
            if key not in summ:
                continue
            s = summ[key]
            if s["reached"] == 0:
                sp, contrib = "did not reach", "n/a"
            else:
                sp = _speedup_cell(key, s)
                sp_vals = s["speedup"]
                contrib = _pct({k: (v - 1.0 if k in ("median", "min", "max") else v) for k, v in sp_vals.items()})
            rows.append((name, label, claim, sp, contrib, spread(s["flop_ratio"], ".3f"),
                         spread(s["flop_ratio_run"], ".3f"), _pct(s["best_vs_plain_rel"]),
                         spread(s["step_time_ms"], ".1f")))
    if not rows:
        return "(no workload ran)"
    note = ("contribution = measured speed-up - 1 (time-to-target, median over seeds); "
            "best held-out vs plain = (variant best - plain best) / plain best; lossy above +0.5%")
    return _grid(header, rows) + "\n" + note


def _first_flash_run(w: Dict[str, Any], variant: str = "flash") -> Optional[Dict[str, Any]]:
    runs = [r for r in w.get("runs", []) if r["variant"] == variant and r.get("box")]
    return min(runs, key=lambda r: r["seed"]) if runs else None


def format_boxes(results: Dict[str, Any]) -> str:
    """Flash Mode's own statistics box from the flash run (first seed) of every workload."""
    parts = []
    for name, w in _ran(results).items():
        run = _first_flash_run(w)
        if run is None:
            continue
        parts.append(f"Flash Mode's own statistics ({name}, seed {run['seed']}, flash run, "
                     f"{run['steps']} steps):\n{run['box']}")
    return "\n\n".join(parts) if parts else "(no flash run: Flash Mode's statistics box not available)"


def format_gap(results: Dict[str, Any]) -> str:
    """Flash Mode's self-reported "Effective Speedup" against the measured time-to-target speed-up."""
    header = ("workload", "variant", "self-reported Effective Speedup", "measured speed-up", "gap (self - measured)")
    rows = []
    for name, w in _ran(results).items():
        for v, s in w["summary"].items():
            if v == "plain" or s["effective_speedup"] is None:
                continue
            measured = "did not reach" if s["reached"] == 0 else _speedup_cell(v, s)
            gap = spread(s["speedup_gap"], "+.2f", "x") if s["reached"] else "n/a (measured: did not reach)"
            rows.append((name, v, spread(s["effective_speedup"], ".2f", "x"), measured, gap))
    if not rows:
        return "(no Flash Mode run)"
    note = ("Effective Speedup counts step time only (a skipped-layer step and a virtual GCA step as worth a full "
            "step);\nthe measured speed-up is time to plain training's best held-out loss.")
    return _grid(header, rows) + "\n" + note


def format_report(results: Dict[str, Any]) -> str:
    """Everything printed at the end of a run."""
    parts = []
    for name, w in results.get("workloads", {}).items():
        if "skipped" in w:
            parts.append(f"[skipped] {name}: {w['skipped']}")
        elif "lr_sweep" in w:
            sw = w["lr_sweep"]
            cells = ", ".join(f"{row['lr']:g}: {row['best_loss']:.4f}" for row in sw["runs"])
            parts.append(f"LR sweep {name} (plain, {sw['steps']} steps, seed {sw['seed']}; best held-out loss): "
                         f"{cells} -> lr {sw['chosen_lr']:g}")
    cfg = results.get("config", {})
    m = results.get("machine", {})
    title = (f"flashfn bench ({cfg.get('mode')}): {len(cfg.get('seed_list', []))} seed(s), "
             f"{m.get('torch_threads')} thread(s), {m.get('cores_available')} core(s), torch {m.get('torch')}, "
             f"transformers {m.get('transformers')}")
    parts += [
        title,
        "Time-to-target (target = plain training's best held-out loss in the same seed; median [min..max] over "
        "seeds):\n" + format_table(results),
        "Ablation (the specification's contribution table, measured):\n" + format_ablation(results),
        format_boxes(results),
        "Self-reported vs measured:\n" + format_gap(results),
    ]
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def sanitise(obj: Any) -> Any:
    """A strict-JSON copy: non-finite floats become ``None``, tuples lists, tensors lists/numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitise(v) for v in obj]
    if hasattr(obj, "tolist"):
        return sanitise(obj.tolist())
    return obj


def write_json(results: Dict[str, Any], path: str) -> str:
    """Write ``results`` to ``path`` as strict JSON; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(sanitise(results), fh, indent=1, allow_nan=False)
        fh.write("\n")
    return path


def write_figure(results: Dict[str, Any], path: str) -> Optional[str]:
    """Held-out loss vs training time (one panel per workload) and ALAS's per-layer activity as heat maps.

    Returns the path, or ``None`` when matplotlib is missing or no workload ran.
    """
    ran = _ran(results)
    if not ran:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    n = len(ran)
    fig = Figure(figsize=(6.5 * n, 9.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for col, (name, w) in enumerate(ran.items()):
        ax = axes[0][col]
        labelled = set()
        targets = []
        for run in sorted(w["runs"], key=lambda r: (r["seed"], r["variant"])):
            v = run["variant"]
            xs = [p["time"] for p in run["curve"]]
            ys = [p["loss"] for p in run["curve"]]
            ax.plot(xs, ys, color=COLORS.get(v), lw=1.6 if v in ("plain", "flash") else 1.0,
                    alpha=0.9 if v not in labelled else 0.45, label=None if v in labelled else v)
            labelled.add(v)
            if v == "plain":
                targets.append(run["figures"]["target"])
        for i, t in enumerate(targets):
            ax.axhline(t, color="black", ls=":", lw=0.8, label="target (plain's best)" if i == 0 else None)
        finite = [p["loss"] for r in w["runs"] for p in r["curve"][1:] if math.isfinite(p["loss"])]
        if finite:
            lo, hi = min(finite), sorted(finite)[int(0.9 * (len(finite) - 1))]
            ax.set_ylim(lo - 0.02 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
        ax.set_title(f"{name}: held-out loss vs training time ({len({r['seed'] for r in w['runs']})} seed(s))")
        ax.set_xlabel("training wall-clock, s (evaluation excluded)")
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

        hax = axes[1][col]
        run = None
        for v in ("flash", "alas"):
            cands = [r for r in w["runs"] if r["variant"] == v and r["activity"]]
            if cands:
                run = min(cands, key=lambda r: r["seed"])
                break
        if run is None:
            hax.text(0.5, 0.5, "no ALAS run", ha="center", va="center", transform=hax.transAxes)
            hax.set_axis_off()
            continue
        steps = [a["step"] for a in run["activity"]]
        grid = [[a["activity"][i] for a in run["activity"]] for i in range(len(run["activity"][0]["activity"]))]
        mids = [(a + b) / 2.0 for a, b in zip(steps, steps[1:])]
        first = steps[0] - (mids[0] - steps[0] if mids else 0.5)
        last = steps[-1] + (steps[-1] - mids[-1] if mids else 0.5)
        x_edges = [first] + mids + [last]
        y_edges = [i - 0.5 for i in range(len(grid) + 1)]
        vmin = min(0.3, min(min(row) for row in grid))  # 0.3: the specification's min_activity
        im = hax.pcolormesh(x_edges, y_edges, grid, vmin=vmin, vmax=1.0, cmap="viridis", shading="flat")
        names = run["layer_names"] or [str(i) for i in range(len(grid))]
        hax.set_yticks(range(len(grid)), names, fontsize=7)
        warmup = (run.get("flash_config") or {}).get("warmup_steps")
        if warmup is not None and x_edges[0] <= warmup <= x_edges[-1]:
            hax.axvline(warmup, color="white", ls="--", lw=1.0)
            hax.text(warmup, len(grid) - 0.6, " end of warm-up", color="white", fontsize=7, va="top")
        hax.set_xlabel("optimizer step")
        hax.set_title(f"{name}: ALAS activity per layer ({run['variant']} run, seed {run['seed']})")
        fig.colorbar(im, ax=hax, label="activity level")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
