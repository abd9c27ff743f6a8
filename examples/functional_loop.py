"""Flash Mode composed in a plain torch.func training loop (a small GPT on the embedded Shakespeare corpus).

    python examples/functional_loop.py --steps 300
"""

import argparse
import time

import torch
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel

from flashfn import FlashConfig
from flashfn.adapters.stats import FlashStats, StepTimer
from flashfn.core.flash import plan_step
from flashfn.data import ByteLMDataset, byte_splits, load_corpus
from flashfn.func import (
    BlockSkipper,
    apply_gradients,
    find_layers,
    finish_step,
    flash_init_for,
    gca_after_step,
    masked_value_and_grad,
    per_sample_losses,
)

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
args = ap.parse_args()
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                   bos_token_id=0, eos_token_id=0))
data = torch.utils.data.DataLoader(ByteLMDataset(byte_splits(load_corpus())[0], seq_len=64,
                                                 num_samples=16 * args.steps), batch_size=16)
cfg = FlashConfig(warmup_steps=50, low_loss_threshold=2.0)

params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
lmap = find_layers(model)                                   # ALAS layers: transformer.h.N
skipper = BlockSkipper(model, lmap, cfg.alas_mechanism)     # skipped blocks really skip their backward
state = flash_init_for(model, lmap, params, cfg=cfg)
opt = torch.optim.AdamW(params.values(), lr=3e-3)
snapshot = None
timer = StepTimer()                                         # step times, for the Effective Speedup


def per_sample_loss(p, b, batch):                           # one loss per sequence (reduction="none")
    logits = functional_call(model, (p, b), (batch["input_ids"],)).logits
    return per_sample_losses(logits[:, :-1], batch["labels"][:, 1:])


for step, batch in enumerate(data):
    t0 = time.perf_counter()
    plan = plan_step(state, cfg)                            # honest? which layers backward? weigh samples?
    grads, loss, aux = masked_value_and_grad(per_sample_loss, params, buffers, batch, lmap=lmap, plan=plan,
                                             skipper=skipper, min_sample_weight=cfg.min_sample_weight,
                                             low_loss_threshold=cfg.low_loss_threshold)
    state, grads, decision = finish_step(state, cfg, plan, lmap, params, grads, loss, aux.weights, optimizer=opt)
    apply_gradients(params, grads)                          # real + interpolated gradients
    opt.step()
    snapshot = gca_after_step(decision, params, opt, snapshot)  # GCA: rollback / checkpoint / virtual steps
    timer.add(time.perf_counter() - t0, skipped_any=bool(plan.skipped))
    if step % 50 == 0:
        print(f"step {step:4d} loss {float(loss):.3f} skipped {plan.skipped} virtual {decision.n_virtual}")

print(FlashStats.compute(state, timer, sum(p.numel() for p in params.values())).box())
