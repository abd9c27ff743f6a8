"""Step time of the torch.func step as the number of skipped layers grows, for each skipping mechanism.

A program that prints figures (not a test). Every configuration is timed in
one process, interleaved round-robin, and the median of the rounds is quoted
with the FLOPs counted by ``FlopCounterMode`` (a cost that does not depend on
machine noise).

    python examples/skip_benchmark.py --rounds 8 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from flashfn.core.flash import StepPlan
from flashfn.func import BlockSkipper, find_layers, masked_value_and_grad, per_sample_losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=256, n_positions=args.seq,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    lmap = find_layers(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    batch = torch.randint(0, 256, (args.batch, args.seq))

    def per_sample_loss(p, b, x):
        logits = functional_call(model, (p, b), (x,)).logits
        return per_sample_losses(logits[:, :-1], x[:, 1:])

    n = len(lmap)
    counts = sorted({0, 2, n // 2 + n % 2, n - 1, n} - {-1})
    configs = []
    for mech in ("branch", "freeze"):
        for k in counts:
            if mech == "freeze" and k == 0:
                continue
            lo = (n - k) // 2  # skip k middle blocks
            compute = torch.ones(n, dtype=torch.bool)
            compute[lo:lo + k] = False
            configs.append((mech if k else "none", k, StepPlan(True, k == 0, compute, False)))
    skippers = {m: BlockSkipper(model, lmap, m) for m in ("branch", "freeze")}

    def step(mech, plan):
        sk = skippers.get(mech, skippers["branch"])
        return masked_value_and_grad(per_sample_loss, params, buffers, batch, lmap=lmap, plan=plan, skipper=sk)

    flops = {}
    for mech, k, plan in configs:
        with FlopCounterMode(display=False) as fc:
            step(mech, plan)
        flops[(mech, k)] = fc.get_total_flops()
    times = {(m, k): [] for m, k, _ in configs}
    for _ in range(2):  # warm up
        for mech, _, plan in configs:
            step(mech, plan)
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for mech, k, plan in order:
            t = time.perf_counter()
            step(mech, plan)
            times[(mech, k)].append(time.perf_counter() - t)
    base = statistics.median(times[("none", 0)])
    base_flops = flops[("none", 0)]
    print(f"GPT-2 {args.layers} blocks, width {args.width}, seq {args.seq}, batch {args.batch}, "
          f"{args.threads} thread(s), torch {torch.__version__}, median of {args.rounds} interleaved rounds")
    print(f"{'mechanism':<10}{'skipped':>8}{'step ms':>10}{'vs none':>10}{'GFLOP':>10}{'vs none':>10}")
    for mech, k, _ in configs:
        med = statistics.median(times[(mech, k)])
        print(f"{mech:<10}{k:>8}{1000 * med:>10.1f}{med / base - 1:>+10.1%}{flops[(mech, k)] / 1e9:>10.2f}"
              f"{flops[(mech, k)] / base_flops - 1:>+10.1%}")


if __name__ == "__main__":
    main()
