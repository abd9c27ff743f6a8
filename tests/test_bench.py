"""Tests for ``flashfn bench`` (``flashfn.bench`` and ``flashfn.cli``).

The end-to-end test runs ``--smoke`` on the embedded corpus with two seeds and
checks the structure of ``results.json`` and that its figures are computed
from the runs. No test asserts a wall-clock value.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashfn.bench import build_parser, main
from flashfn.bench.report import sanitise
from flashfn.bench.runner import LOSSY_THRESHOLD, BenchOptions, analyse_seed, rotated, summarise
from flashfn.bench.workloads import VARIANTS, RunResult, variant_config
from flashfn.data import fashion_mnist_available

ROOT = Path(__file__).resolve().parents[1]
SMOKE_STEPS = 40


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- #
# End to end: --smoke on the embedded corpus, two seeds
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--smoke", "--workload", "shakespeare", "--seeds", "2", "--no-progress", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    return {"rc": rc, "out": out, "results": results, "wl": results["workloads"]["shakespeare"]}


def test_smoke_exit_status_and_files(smoke: dict) -> None:
    assert smoke["rc"] == 0
    png = smoke["out"] / "bench.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_json_records_config_and_machine(smoke: dict) -> None:
    r = smoke["results"]
    assert "--smoke" in r["command"]
    assert r["config"]["mode"] == "smoke" and r["config"]["seed_list"] == [0, 1]
    assert r["config"]["threads"] == 1
    m = r["machine"]
    for key in ("date", "cpu_count", "cores_available", "torch", "transformers", "torch_threads"):
        assert m[key] is not None, key
    assert m["torch_threads"] == 1
    assert smoke["wl"]["settings"]["steps"] == SMOKE_STEPS
    assert _finite(smoke["wl"]["lr"])


def test_smoke_every_variant_every_seed(smoke: dict) -> None:
    wl = smoke["wl"]
    assert set(wl["summary"]) == set(VARIANTS)
    pairs = {(run["seed"], run["variant"]) for run in wl["runs"]}
    assert pairs == {(s, v) for s in (0, 1) for v in VARIANTS}
    for run in wl["runs"]:
        f = run["figures"]
        for key in ("target", "best_loss", "final_loss", "final_gap", "train_time_s", "step_time_ms", "flops_run",
                    "flop_ratio_run"):
            assert _finite(f[key]), (run["variant"], key)
        assert f["train_time_s"] > 0
        assert len(run["skipped"]) == SMOKE_STEPS
        assert [p["step"] for p in run["curve"]] == [0, 10, 20, 30, 40]
        assert all(_finite(p["loss"]) and _finite(p["time"]) for p in run["curve"])
        times = [p["time"] for p in run["curve"]]
        assert times == sorted(times) and times[0] == 0.0


def test_smoke_target_is_plain_best_of_the_same_seed(smoke: dict) -> None:
    runs = smoke["wl"]["runs"]
    for seed in (0, 1):
        plain = next(r for r in runs if r["seed"] == seed and r["variant"] == "plain")
        target = min(p["loss"] for p in plain["curve"][1:])
        for r in runs:
            if r["seed"] == seed:
                assert r["figures"]["target"] == pytest.approx(target)
        pf = plain["figures"]
        assert pf["reached"] and pf["speedup"] == pytest.approx(1.0) and pf["flop_ratio"] == pytest.approx(1.0)
        assert pf["best_loss"] == pytest.approx(target)


def test_smoke_speedup_is_a_number_or_did_not_reach_with_gap(smoke: dict) -> None:
    for r in smoke["wl"]["runs"]:
        f = r["figures"]
        if f["reached"]:
            assert _finite(f["speedup"]) and f["speedup"] > 0
            assert _finite(f["time_to_target_s"]) and isinstance(f["steps_to_target"], int)
            assert _finite(f["flop_ratio"]) and f["flop_ratio"] > 0
            hit = next(p for p in r["curve"] if p["loss"] <= f["target"])
            assert f["time_to_target_s"] == pytest.approx(hit["time"])
        else:
            assert f["speedup"] is None and f["time_to_target_s"] is None and f["flop_ratio"] is None
            assert _finite(f["final_gap"]) and f["final_gap"] > 0
        rel = (f["best_loss"] - f["target"]) / f["target"]
        assert f["lossy"] == (rel > LOSSY_THRESHOLD)


def test_smoke_figures_are_measured_not_constant(smoke: dict) -> None:
    runs = smoke["wl"]["runs"]
    plain = {r["seed"]: r for r in runs if r["variant"] == "plain"}
    assert [p["loss"] for p in plain[0]["curve"]] != [p["loss"] for p in plain[1]["curve"]]
    timings = [r["figures"]["train_time_s"] for r in runs]
    assert len(set(timings)) > 1
    summ = smoke["wl"]["summary"]["plain"]["best_loss"]
    assert summ["n"] == 2 and summ["min"] <= summ["median"] <= summ["max"]


def test_smoke_variants_alternate_in_rotated_order(smoke: dict) -> None:
    order = {(r["seed"], r["order"]): r["variant"] for r in smoke["wl"]["runs"]}
    assert [order[(0, i)] for i in range(len(VARIANTS))] == list(VARIANTS)
    assert [order[(1, i)] for i in range(len(VARIANTS))] == rotated(VARIANTS, 1)


def test_smoke_flash_statistics_and_activity(smoke: dict) -> None:
    wl = smoke["wl"]
    for r in wl["runs"]:
        if r["variant"] == "plain":
            assert r["flash_stats"] is None and r["box"] is None and r["flash_config"] is None
            assert all(p == [] for p in r["skipped"])
            continue
        assert "FLASH MODE" in r["box"]
        assert r["flash_config"]["warmup_steps"] == 10  # the --smoke override, recorded
        assert r["flash_stats"]["total_steps"] == SMOKE_STEPS
        if r["variant"] in ("flash", "alas"):
            n = len(r["layer_names"])
            assert n >= 2 and len(r["activity"]) == len(r["curve"])
            assert all(len(a["activity"]) == n for a in r["activity"])
            assert all(0.0 < x <= 1.0 for a in r["activity"] for x in a["activity"])
    flops = wl["flops_per_step"]
    assert flops["honest"] > 0
    for row in flops["by_pattern"]:
        assert 0 < row["flops"] <= flops["honest"]
        if row["skipped"]:
            assert row["flops"] < flops["honest"]


def test_smoke_prints_the_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["--smoke", "--workload", "shakespeare", "--variants", "plain,flash", "--steps", "20",
               "--no-progress", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    for needle in ("Time-to-target", "Ablation", "FLASH MODE", "Self-reported vs measured", "results.json"):
        assert needle in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["workloads"]["shakespeare"]["summary"]) == {"plain", "flash"}


def test_lr_sweep_picks_the_best_plain_run_and_records_it(tmp_path: Path) -> None:
    rc = main(["--smoke", "--workload", "shakespeare", "--variants", "plain", "--lr-sweep", "--sweep-steps", "10",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    wl = json.loads((tmp_path / "results.json").read_text())["workloads"]["shakespeare"]
    sweep = wl["lr_sweep"]
    assert [row["lr"] for row in sweep["runs"]] == sweep["grid"] and len(sweep["grid"]) >= 3
    assert all(row["steps"] == 10 and _finite(row["best_loss"]) for row in sweep["runs"])
    best = min(sweep["runs"], key=lambda row: row["best_loss"])
    assert sweep["chosen_lr"] == best["lr"] == wl["lr"]
    assert all(run["lr"] == wl["lr"] for run in wl["runs"])


# --------------------------------------------------------------------------- #
# Fashion-MNIST: the torch.func loop, or a clear skip
# --------------------------------------------------------------------------- #


def test_fashion_skipped_with_install_hint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["--smoke", "--workload", "fashion", "--fashion-root", str(tmp_path / "absent"), "--no-progress",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "apt-get install dataset-fashion-mnist" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert "apt-get install dataset-fashion-mnist" in results["workloads"]["fashion"]["skipped"]
    assert not (tmp_path / "bench.png").exists()


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)")
def test_fashion_smoke_functional_loop(tmp_path: Path) -> None:
    rc = main(["--smoke", "--workload", "fashion", "--variants", "plain,flash,gca", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    wl = json.loads((tmp_path / "results.json").read_text())["workloads"]["fashion"]
    runs = {r["variant"]: r for r in wl["runs"]}
    assert set(runs) == {"plain", "flash", "gca"}
    for r in runs.values():
        assert all("accuracy" in p for p in r["curve"])
        assert len(r["skipped"]) == SMOKE_STEPS
    assert runs["flash"]["flash_stats"]["total_steps"] == SMOKE_STEPS
    assert runs["flash"]["layer_names"] == [f"blocks.{i}" for i in range(3)]
    assert runs["flash"]["flash_stats"]["samples_weighted"] > 0


def test_code_finetune_smoke_starts_from_the_pretrained_model(tmp_path: Path) -> None:
    """The check workload: every variant starts from the same pretrained weights and is judged on held-out code."""
    from flashfn.bench.workloads import FINETUNE_PRESETS, CodeFinetuneLM, ShakespeareLM, load_code_corpus

    wl = CodeFinetuneLM(FINETUNE_PRESETS["smoke"])
    scratch = ShakespeareLM(FINETUNE_PRESETS["smoke"])
    torch.manual_seed(0)
    a = wl.build_model()
    torch.manual_seed(1)
    b = wl.build_model()
    torch.manual_seed(0)
    fresh = scratch.build_model()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), fresh.state_dict().values()))
    assert b"def " in load_code_corpus(50_000)
    assert wl.evaluate(a) < scratch.evaluate(fresh)  # pretraining on English already helps on code
    rc = main(["--smoke", "--workload", "code-finetune", "--variants", "plain,flash", "--steps", "20",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "results.json").read_text())["workloads"]["code-finetune"]["runs"]
    assert {r["variant"] for r in runs} == {"plain", "flash"}
    assert runs[0]["curve"][0]["loss"] == runs[1]["curve"][0]["loss"]  # same start for every variant


# --------------------------------------------------------------------------- #
# The figures, on synthetic runs (exact values)
# --------------------------------------------------------------------------- #


def _run(variant: str, points: list, patterns: list, layers: int = 2) -> RunResult:
    r = RunResult("synthetic", variant, 0, 1e-3, len(patterns))
    r.curve = [{"step": s, "time": t, "loss": loss} for s, t, loss in points]
    r.patterns = [tuple(p) for p in patterns]
    r.layer_names = [f"l{i}" for i in range(layers)] if variant != "plain" else []
    return r


def _flops(pattern: tuple) -> int:
    return 10 - 3 * len(pattern)


def test_analyse_seed_exact_figures() -> None:
    plain = _run("plain", [(0, 0.0, 5.0), (2, 2.0, 3.0), (4, 4.0, 2.0)], [()] * 4)
    fast = _run("flash", [(0, 0.0, 5.0), (2, 1.0, 1.9), (4, 2.0, 1.8)], [(), (0,), (0, 1), ()],
                layers=2)
    fast.flash_stats = {"effective_speedup": 1.5}
    slow = _run("alas", [(0, 0.0, 5.0), (2, 2.5, 2.5), (4, 5.0, 2.05)], [()] * 4)
    figs = analyse_seed({"plain": plain, "flash": fast, "alas": slow}, _flops)
    assert figs["plain"]["target"] == 2.0 and figs["plain"]["speedup"] == 1.0
    f = figs["flash"]
    assert f["reached"] and f["steps_to_target"] == 2 and f["time_to_target_s"] == 1.0
    assert f["speedup"] == pytest.approx(4.0)
    assert f["flops_to_target"] == 10 + 7 and f["flop_ratio"] == pytest.approx(17 / 40)
    assert f["flops_run"] == 10 + 7 + 4 + 10 and f["flop_ratio_run"] == pytest.approx(31 / 40)
    assert f["skipped_layer_share"] == pytest.approx(3 / 8)
    assert f["effective_speedup"] == 1.5 and f["speedup_gap"] == pytest.approx(1.5 - 4.0)
    assert not f["lossy"] and f["final_gap"] == pytest.approx(-0.2)
    s = figs["alas"]
    assert not s["reached"] and s["speedup"] is None and s["flop_ratio"] is None
    assert s["final_gap"] == pytest.approx(0.05) and s["final_gap_rel"] == pytest.approx(0.025)
    assert s["lossy"]  # 2.5% worse than plain's best


def test_summarise_median_and_spread_and_reach_count() -> None:
    def one(speedup, reached):
        return {"plain": {"reached": True, "lossy": False, "speedup": 1.0},
                "flash": {"reached": reached, "lossy": False, "speedup": speedup}}

    summ = summarise([one(1.2, True), one(None, False), one(0.8, True)], ["plain", "flash"])
    assert summ["flash"]["reached"] == 2 and summ["flash"]["seeds"] == 3
    assert summ["flash"]["speedup"] == {"median": pytest.approx(1.0), "min": 0.8, "max": 1.2, "n": 2}
    assert summ["flash"]["best_loss"] is None


# --------------------------------------------------------------------------- #
# Options, parser, CLI
# --------------------------------------------------------------------------- #


def test_rotated() -> None:
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_options_always_run_plain_and_validate() -> None:
    opts = BenchOptions(variants=("gca", "flash"))
    assert opts.variants == ("plain", "flash", "gca")
    assert BenchOptions(mode="quick").n_seeds == 1 and BenchOptions().n_seeds == 3
    with pytest.raises(ValueError, match="variants"):
        BenchOptions(variants=("fast",))
    with pytest.raises(ValueError, match="threads"):
        BenchOptions(threads=0)
    with pytest.raises(ValueError, match="exclude"):
        BenchOptions(lr=1e-3, lr_sweep=True)


def test_variant_configs_are_the_spec_defaults_but_the_switches() -> None:
    from flashfn.config import FlashConfig

    base = FlashConfig().to_dict()
    for v, switches in {"flash": (True, True, True), "alas": (True, False, False),
                        "weighting": (False, True, False), "gca": (False, False, True)}.items():
        d = variant_config(v, seed=3).to_dict()
        assert (d["enable_alas"], d["enable_sample_weighting"], d["enable_gca"]) == switches
        assert d["seed"] == 3 and d["warmup_steps"] == 100
        assert {k: x for k, x in d.items() if not k.startswith("enable_") and k != "seed"} == \
            {k: x for k, x in base.items() if not k.startswith("enable_") and k != "seed"}


def test_parser_variants_and_modes() -> None:
    args = build_parser().parse_args(["--variants", "plain,flash", "gca", "--quick", "--threads", "2"])
    assert args.variants == ["plain", "flash", "gca"] and args.quick and args.threads == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quick", "--smoke"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--variants", "turbo"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--lr", "1e-3", "--lr-sweep"])


def test_cli_bench_help_and_module_entry_point() -> None:
    from flashfn.cli import main as cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--help"])
    assert exc.value.code == 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "flashfn.bench", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--lr-sweep" in proc.stdout


def test_sanitise_makes_strict_json() -> None:
    data = sanitise({"a": float("nan"), "b": (1, float("inf")), 3: [0.5]})
    assert data == {"a": None, "b": [1, None], "3": [0.5]}
    json.dumps(data, allow_nan=False)
