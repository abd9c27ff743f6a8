"""The specification's quick-start on a small GPT-2 built from a config, trained on the embedded Shakespeare corpus.

    python examples/trainer_quickstart.py --steps 400
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

try:  # the specification's path, installed with flashfn
    from transformers.flash_mode import FlashConfig, FlashModeCallback
except ModuleNotFoundError:  # a source checkout that was not pip-installed: the native path
    from flashfn import FlashConfig, FlashModeCallback

from flashfn.data import ByteLMDataset, byte_splits, load_corpus

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=400)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

train_tokens, _ = byte_splits(load_corpus())
dataset = ByteLMDataset(train_tokens, seq_len=64, num_samples=16 * args.steps)
model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                   bos_token_id=0, eos_token_id=0))
training_args = TrainingArguments(output_dir="flashfn-quickstart", per_device_train_batch_size=16,
                                  max_steps=args.steps, learning_rate=3e-3, lr_scheduler_type="cosine",
                                  logging_steps=50, save_strategy="no", report_to=[], use_cpu=True, seed=0)

# Flash Mode configuration (the specification's; warm-up lowered for a short demo run)
config = FlashConfig(
    enable_alas=True,
    enable_sample_weighting=True,
    enable_gca=True,
    warmup_steps=min(100, args.steps // 4),
)

# Add the callback to the Trainer
trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=dataset,
    callbacks=[FlashModeCallback(config)],
)

trainer.train()  # prints the statistics box at the end
