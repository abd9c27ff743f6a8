"""``flashfn bench``: plain training and Flash Mode side by side, judged by time-to-target.

Run it as ``flashfn bench [options]`` or ``python -m flashfn.bench [options]``;
``docs/benchmark.md`` gives the protocol, every option and the definition of
every figure. Importing this package is cheap (no torch); the work happens in
:mod:`flashfn.bench.runner` (seeds x variants, figures),
:mod:`flashfn.bench.workloads` (data, models, training loops, FLOP counts) and
:mod:`flashfn.bench.report` (tables, ``results.json``, the figure).

Example:
    >>> from flashfn.bench import build_parser
    >>> build_parser().parse_args(["--quick", "--workload", "shakespeare"]).workload
    'shakespeare'
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any, Optional, Sequence

__all__ = ["VARIANT_NAMES", "add_arguments", "build_parser", "main", "options_from_args", "run_from_args"]

#: The variants (mirrors :data:`flashfn.bench.workloads.VARIANTS`, kept here so the parser needs no torch).
VARIANT_NAMES = ("plain", "flash", "alas", "weighting", "gca")

DESCRIPTION = (
    "Side-by-side time-to-target benchmark: plain training against Flash Mode and each of its components alone "
    "(ALAS, sample weighting, GCA), same seed, data order, model init, optimizer, schedule and clipping. "
    "Prints the time-to-target table, the ablation, Flash Mode's own statistics box and its gap to the measured "
    "speed-up; writes results.json and bench.png into --out."
)


class _VariantsAction(argparse.Action):
    """``--variants a,b c``: comma- or space-separated names, checked against the variants, accumulated."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        names = [t for v in values for t in v.replace(",", " ").split() if t]
        bad = [t for t in names if t not in VARIANT_NAMES]
        if bad:
            parser.error(f"argument --variants: unknown variant(s) {', '.join(bad)}; choose from "
                         f"{', '.join(VARIANT_NAMES)}")
        setattr(namespace, self.dest, (getattr(namespace, self.dest, None) or []) + names)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (used by ``flashfn bench`` and ``python -m flashfn.bench``)."""
    parser.add_argument("--workload", choices=("shakespeare", "fashion", "code-finetune", "all"), default="all",
                        help="which workload(s) to run (default: all = shakespeare and fashion; fashion is skipped "
                             "with a message when Fashion-MNIST is not installed; code-finetune is the check "
                             "workload: the Shakespeare model pretrained, then fine-tuned on Python source)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a few minutes on 2 cores: 300 steps, 1 seed, smaller evaluation")
    size.add_argument("--smoke", action="store_true",
                      help="end-to-end test in under a minute: tiny models, 40 steps, Flash Mode warm-up 10 steps")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="optimizer steps per run (default 1200; --quick 300; --smoke 40)")
    parser.add_argument("--eval-every", type=_positive_int, default=None,
                        help="evaluate the held-out loss every K steps (default 50; --quick 25; --smoke 10)")
    parser.add_argument("--seeds", type=_positive_int, default=None,
                        help="number of seeds 0..N-1 (default 3; --quick and --smoke 1)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch.set_num_threads for every run (default 1: the most stable timing on a shared "
                             "machine, see docs/benchmark.md)")
    parser.add_argument("--variants", nargs="+", action=_VariantsAction, default=None, metavar="NAME",
                        help="subset of plain,flash,alas,weighting,gca (comma or space separated; plain is always "
                             "run: it defines the target)")
    lr = parser.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=_positive_float, default=None,
                    help="peak learning rate for every selected workload (default: each workload's tuned value, "
                         "see docs/benchmark.md)")
    lr.add_argument("--lr-sweep", action="store_true",
                    help="first run plain training at each workload's learning-rate grid for a shorter budget, "
                         "pick the best held-out loss and use it; the sweep is recorded in results.json")
    parser.add_argument("--sweep-steps", type=_positive_int, default=None,
                        help="steps per sweep run (default: half of --steps)")
    parser.add_argument("--fashion-root", default=None, metavar="DIR",
                        help="folder holding the Fashion-MNIST idx .gz files (default: /usr/share/datasets/"
                             "fashion-mnist, from `apt-get install dataset-fashion-mnist`)")
    parser.add_argument("--out", default="flashfn-results", metavar="DIR",
                        help="output folder for results.json and bench.png (default ./flashfn-results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The stand-alone parser of ``python -m flashfn.bench``."""
    parser = argparse.ArgumentParser(prog=prog or "python -m flashfn.bench", description=DESCRIPTION)
    return add_arguments(parser)


def options_from_args(args: argparse.Namespace, command: str = ""):
    """A :class:`flashfn.bench.runner.BenchOptions` from parsed arguments."""
    from .runner import BenchOptions

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    workloads = ("shakespeare", "fashion") if args.workload == "all" else (args.workload,)
    return BenchOptions(
        workloads=workloads,
        variants=tuple(args.variants) if args.variants else VARIANT_NAMES,
        mode=mode,
        seeds=args.seeds,
        steps=args.steps,
        eval_every=args.eval_every,
        threads=args.threads,
        out=args.out,
        lr=args.lr,
        lr_sweep=bool(args.lr_sweep),
        sweep_steps=args.sweep_steps,
        fashion_root=args.fashion_root,
        progress=not args.no_progress,
        command=command,
    )


def run_from_args(args: argparse.Namespace, command: str = "") -> int:
    """Run the benchmark, print the report, write ``results.json`` and ``bench.png``; returns the exit status."""
    from .report import format_report, write_figure, write_json
    from .runner import run_benchmark

    opts = options_from_args(args, command)
    t0 = time.perf_counter()
    results = run_benchmark(opts)
    print()
    print(format_report(results))
    out = os.path.abspath(opts.out)
    json_path = write_json(results, os.path.join(out, "results.json"))
    png_path = write_figure(results, os.path.join(out, "bench.png"))
    print()
    print(f"results: {json_path}")
    print(f"figure:  {png_path if png_path else 'not written (matplotlib missing or nothing ran)'}")
    print(f"total wall time: {time.perf_counter() - t0:.1f} s")
    ran = [w for w in results["workloads"].values() if "summary" in w]
    return 0 if ran else 1


def _command(prog: str, argv: Sequence[str]) -> str:
    return " ".join([prog] + [shlex.quote(a) for a in argv])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m flashfn.bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_from_args(args, _command("python -m flashfn.bench", argv))
