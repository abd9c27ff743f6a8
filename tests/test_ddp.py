"""Data parallelism through the Trainer: 2 processes (gloo, CPU) launched with ``torchrun``, every component on.

Each process of ``tests/ddp_worker.py`` writes what it ended with; the test
checks that both took the same decisions and ended bit-identical, and that
the run really exercised what it is meant to show (skips, virtual steps,
down-weighted samples, different data on each process). Also: the set-ups
Flash Mode refuses (DeepSpeed, FSDP, DDP without ``find_unused_parameters``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from trainer_helpers import BATCH, tiny_gpt2

import flashfn
from flashfn import FlashConfig, FlashModeCallback

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ddp_worker.py")
TIMEOUT_S = 300

gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with the gloo backend is not available in this torch build")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(flashfn.__file__)))  # the flashfn under test
    env["PYTHONPATH"] = os.pathsep.join([HERE, src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), WORKER, str(out)]
    proc = subprocess.run(cmd, env=env, cwd=str(out), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    ranks = []
    for r in (0, 1):
        with open(out / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    return ranks


@gloo
def test_two_processes_take_the_same_decisions_and_end_bit_identical(ddp_run) -> None:
    from ddp_worker import ACCUM, CFG, STEPS

    r0, r1 = ddp_run
    assert [r0["rank"], r1["rank"]] == [0, 1]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["ddp"] == "DistributedDataParallel"
    # each process trained on its own samples: its own losses differ from the other's
    assert len(r0["local_losses"]) == STEPS
    assert r0["local_losses"] != r1["local_losses"]
    # the same plan on every step (active, weighted, which layers skipped), the same counters and statistics
    assert r0["plans"] == r1["plans"]
    assert r0["counters"] == r1["counters"]
    assert r0["weighting"] == r1["weighting"]
    assert r0["spikes"] == r1["spikes"] and r0["rollbacks"] == r1["rollbacks"]
    # Flash Mode's whole state and the parameters: bit-identical
    assert r0["flash_state"] == r1["flash_state"]
    assert r0["params"] == r1["params"]
    # and the run did what it is meant to exercise
    c = r0["counters"]
    assert c["steps"] == STEPS and c["active_steps"] >= STEPS - CFG.warmup_steps - 1
    assert c["skipped_layer_steps"] >= 2, "ALAS is meant to skip blocks in this run"
    assert sum(1 for _, _, skipped in r0["plans"] if skipped) >= 2
    # DDP (find_unused_parameters) left the skipped blocks without a gradient: no backward, no reduction into them
    flags = [f for r in (r0, r1) for step in r["skipped_grads_none"] for f in step]
    assert flags and all(flags)
    assert c["virtual_steps"] >= 1, "GCA is meant to take virtual steps in this run"
    # every process's sample weights are in the statistics: 2 processes x BATCH x ACCUM per weighted step
    weighted_steps = sum(1 for _, weigh, _ in r0["plans"] if weigh)
    assert weighted_steps >= 1
    assert r0["weighting"]["count"] == weighted_steps * 2 * BATCH * ACCUM
    assert 0 < r0["weighting"]["low_count"] <= r0["weighting"]["count"]


@gloo
def test_ddp_without_find_unused_parameters_is_refused(ddp_run) -> None:
    for r in ddp_run:
        assert r["refusal"] is not None, "a Trainer with ddp_find_unused_parameters=False trained with ALAS on"
        assert "ddp_find_unused_parameters=True" in r["refusal"]
        assert "enable_alas=False" in r["refusal"]


@pytest.mark.parametrize("setup", [dict(deepspeed="ds_config.json"), dict(fsdp=["full_shard"])],
                         ids=["deepspeed", "fsdp"])
def test_deepspeed_and_fsdp_are_refused_at_the_start_of_training(setup) -> None:
    args = SimpleNamespace(**{"deepspeed": None, "fsdp": [], "world_size": 1, "max_steps": 10,
                              "max_grad_norm": 1.0, **setup})
    cb = FlashModeCallback(FlashConfig(), verbose=False)
    model = tiny_gpt2()
    with pytest.raises(RuntimeError, match="DeepSpeed or FSDP"):
        cb.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model)
    assert cb.state is None and "forward" not in vars(model)  # nothing installed, nothing started


def test_with_the_defaults_every_process_steps_back_on_the_same_step(ddp_run) -> None:
    """Default predictor and step-back rules under DDP: the same steps back, the same state, the same parameters."""
    d0, d1 = ddp_run[0]["defaults"], ddp_run[1]["defaults"]
    assert d0["stepped_back"] == d1["stepped_back"]
    assert any(at is not None for at in d0["stepped_back"].values())  # something did step back in this run
    assert d0["events"] == d1["events"] and d0["events"]
    assert d0["flash_state"] == d1["flash_state"]
    assert d0["params"] == d1["params"]
