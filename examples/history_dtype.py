"""The memory / fidelity trade-off of ``FlashConfig.history_dtype``, measured through the benchmark's workload.

Trains the Shakespeare byte GPT-2 of ``flashfn bench --quick`` (6 blocks, width
64, 300 optimizer steps, one torch thread) with ALAS alone and with all of
Flash Mode, once with a float32 and once with a bfloat16 gradient history, and
prints, per run: the bytes of ALAS's history and of all Flash Mode state (and
as multiples of the model's float32 parameter bytes), ALAS's measured
prediction fidelity and skipped share, and the held-out loss.

    python examples/history_dtype.py [--steps 300] [--seeds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from flashfn.bench.workloads import LM_PRESETS, ShakespeareLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for variant in ("plain", "alas", "flash"):
        for dtype in (("float32",) if variant == "plain" else ("float32", "bfloat16")):
            settings = dataclasses.replace(LM_PRESETS["quick"], steps=a.steps, flash_overrides={"history_dtype": dtype})
            wl = ShakespeareLM(settings)
            runs = [wl.run(variant, seed, settings.lr) for seed in range(a.seeds)]
            st = [r.flash_stats or {} for r in runs]

            def med(key: str, st: list = st) -> float:
                vals = [s[key] for s in st if s.get(key) is not None]
                return statistics.median(vals) if vals else float("nan")

            rows.append((variant, dtype if variant != "plain" else "-", med("alas_history_bytes"),
                         med("alas_history_vs_params"), med("memory_bytes"), med("memory_vs_params"),
                         med("alas_mean_fidelity"), med("alas_skipped_layer_share"),
                         statistics.median(r.curve[-1]["loss"] for r in runs),
                         statistics.median(min(c["loss"] for c in r.curve) for r in runs),
                         statistics.median(1000 * r.train_time / r.steps for r in runs)))
            print(rows[-1], flush=True)
    print()
    print("| variant | history dtype | ALAS history | x params | all Flash Mode state | x params | fidelity | "
          "skipped layer-steps | final held-out loss | best held-out loss | ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v, d, hb, hx, mb, mx, fid, sk, fin, best, ms in rows:
        print(f"| {v} | {d} | {hb / 1e6:.2f} MB | {hx:.2f}x | {mb / 1e6:.2f} MB | {mx:.2f}x | {fid:.3f} | "
              f"{100 * sk:.1f}% | {fin:.4f} | {best:.4f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
