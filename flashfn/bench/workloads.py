"""The workloads of ``flashfn bench``: data, model, training loop and FLOP count of each.

Three workloads, each run once per (variant, seed) by :mod:`flashfn.bench.runner`:

- :class:`ShakespeareLM`: a small byte-level GPT-2 (``GPT2Config``, vocabulary
  256) on the embedded Shakespeare corpus, trained by the ``transformers``
  ``Trainer``; Flash Mode enters only through ``callbacks=[FlashModeCallback]``.
- :class:`FashionMLP`: a residual MLP on Fashion-MNIST trained by a custom
  ``torch.func`` loop that drives Flash Mode through the functional API
  (``plan_step`` / ``masked_value_and_grad`` / ``finish_step`` /
  ``apply_gradients`` / ``gca_after_step``); with Flash Mode off the same loop
  takes ``torch.func.grad`` of the plain mean loss.
- :class:`CodeFinetuneLM`: the check workload, of another family: the
  Shakespeare model, pretrained, fine-tuned on Python source code (not part of
  ``--workload all``: Flash Mode's defaults were chosen on the other two).

Every run of a workload shares the seed's model initialisation, data order,
optimizer (AdamW), learning-rate schedule (linear warm-up then cosine) and
gradient clipping; only the Flash Mode configuration differs. The training
clock runs over the training steps only: it is paused while the held-out loss
is evaluated (under ``torch.no_grad``) every ``eval_every`` steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FlashConfig

__all__ = [
    "VARIANTS",
    "COMPONENTS",
    "RunResult",
    "Workload",
    "ShakespeareLM",
    "FashionMLP",
    "CodeFinetuneLM",
    "load_code_corpus",
    "variant_config",
    "WORKLOADS",
]

#: The variants, in their base order: plain training, Flash Mode, and each component alone.
VARIANTS: Tuple[str, ...] = ("plain", "flash", "alas", "weighting", "gca")

#: ``(enable_alas, enable_sample_weighting, enable_gca)`` of each Flash Mode variant.
COMPONENTS: Dict[str, Tuple[bool, bool, bool]] = {
    "flash": (True, True, True),
    "alas": (True, False, False),
    "weighting": (False, True, False),
    "gca": (False, False, True),
}

Progress = Optional[Callable[[int], None]]


def variant_config(variant: str, *, seed: int, overrides: Optional[Dict[str, Any]] = None) -> Optional[FlashConfig]:
    """The ``FlashConfig`` of ``variant`` (``None`` for ``"plain"``).

    Every Flash Mode variant keeps the specification's defaults; only the
    component switches differ, ``seed`` (the run's seed, so ALAS's draws differ
    between seeds) is set, and ``overrides`` (used by ``--smoke`` only) apply.

    Example:
        >>> variant_config("alas", seed=0).enable_gca
        False
        >>> variant_config("plain", seed=0) is None
        True
    """
    if variant == "plain":
        return None
    if variant not in COMPONENTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    alas, weighting, gca = COMPONENTS[variant]
    return FlashConfig(enable_alas=alas, enable_sample_weighting=weighting, enable_gca=gca, seed=int(seed),
                       **(overrides or {}))


@dataclass
class RunResult:
    """What one training run produced (raw figures; the analysis is in :mod:`flashfn.bench.runner`).

    Attributes:
        curve: one dict per evaluation: ``step``, ``time`` (training seconds
            so far, evaluation excluded), ``loss`` (held-out), optionally
            ``accuracy``. The first is at step 0, the last at the final step.
        patterns: per optimizer step, the indices of the layers whose
            backward was skipped (empty for an honest step).
        activity: per evaluation, ``{"step", "activity"}`` with ALAS's
            per-layer activity (runs with ALAS only).
        flash_config: the run's ``FlashConfig`` as a dict (``None`` for plain training).
        flash_stats: Flash Mode's own figures (``FlashStats``) at the end, or ``None``.
        box: Flash Mode's statistics box, or ``None``.
        events: Flash Mode's logged events (spikes, rollbacks, warnings).
        batch_fraction: per optimizer step, the share of the batch trained on
            (below 1 where samples were pruned; empty: always the whole batch).
    """

    workload: str
    variant: str
    seed: int
    lr: float
    steps: int
    curve: List[Dict[str, float]] = field(default_factory=list)
    patterns: List[Tuple[int, ...]] = field(default_factory=list)
    activity: List[Dict[str, Any]] = field(default_factory=list)
    layer_names: List[str] = field(default_factory=list)
    flash_config: Optional[Dict[str, Any]] = None
    flash_stats: Optional[Dict[str, Any]] = None
    box: Optional[str] = None
    events: List[str] = field(default_factory=list)
    wall_time: float = 0.0
    batch_fraction: List[float] = field(default_factory=list)

    @property
    def train_time(self) -> float:
        """Training seconds of the whole run (evaluation excluded)."""
        return float(self.curve[-1]["time"]) if self.curve else 0.0


def _cosine_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 0 (the ``Trainer``'s ``lr_scheduler_type="cosine"``)."""

    def f(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return f


class _Clock:
    """A training clock that can be paused (for evaluation)."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._t0: Optional[float] = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def pause(self) -> float:
        if self._t0 is not None:
            self.elapsed += time.perf_counter() - self._t0
            self._t0 = None
        return self.elapsed


class Workload:
    """Base class: a named training set-up with ``run`` and ``step_flops``.

    Subclasses define ``name``, ``settings`` (a dataclass recorded in the
    JSON), :meth:`unavailable`, :meth:`run` and :meth:`_count_flops`.
    """

    name = "workload"
    settings: Any

    def unavailable(self) -> Optional[str]:
        """Why this workload cannot run here (``None`` when it can)."""
        return None

    def run(self, variant: str, seed: int, lr: float, *, steps: Optional[int] = None,
            progress: Progress = None) -> RunResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def step_flops(self, pattern: Tuple[int, ...]) -> int:
        """FLOPs of one training step (forward + backward) with the layers of ``pattern`` skipped.

        Counted once per pattern with ``torch.utils.flop_counter.FlopCounterMode``
        on a fresh model, outside every timed region, and cached. Only
        matrix products are counted (what ``FlopCounterMode`` counts); the
        optimizer, clipping and Flash Mode's own bookkeeping are not.
        """
        cache = self.__dict__.setdefault("_flop_cache", {})
        key = tuple(sorted(int(i) for i in pattern))
        if key not in cache:
            cache[key] = int(self._count_flops(key))
        return cache[key]

    def _count_flops(self, pattern: Tuple[int, ...]) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return {"name": self.name, **dataclasses.asdict(self.settings)}


# --------------------------------------------------------------------------- #
# Shakespeare: byte-level GPT-2 through the transformers Trainer
# --------------------------------------------------------------------------- #


@dataclass
class TrainSettings:
    """What every workload shares: run length, evaluation, optimizer and schedule."""

    steps: int = 1200
    eval_every: int = 50
    weight_decay: float = 0.01
    lr_warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    flash_overrides: Dict[str, Any] = field(default_factory=dict)

    def lr_warmup(self, steps: int) -> int:
        """Learning-rate warm-up steps for a run of ``steps``."""
        return max(1, int(round(self.lr_warmup_fraction * steps)))


@dataclass
class LMSettings(TrainSettings):
    """Sizes and hyper-parameters of the Shakespeare workload."""

    eval_batches: int = 8
    batch_size: int = 16
    seq_len: int = 64
    n_layer: int = 6
    n_embd: int = 64
    n_head: int = 4
    lr: float = 2e-3
    lr_grid: Tuple[float, ...] = (1e-3, 2e-3, 4e-3, 8e-3)


LM_PRESETS: Dict[str, LMSettings] = {
    "full": LMSettings(),
    "quick": LMSettings(steps=300, eval_every=25, eval_batches=4),
    "smoke": LMSettings(steps=40, eval_every=10, eval_batches=2, batch_size=8, seq_len=32, n_layer=3, n_embd=32,
                        n_head=2, flash_overrides={"warmup_steps": 10, "honest_check_every": 5, "log_every": 10}),
}


class ShakespeareLM(Workload):
    """Byte-level GPT-2 on the embedded Shakespeare corpus, trained by the ``transformers`` ``Trainer``.

    Args:
        settings: an :class:`LMSettings`.
    """

    name = "shakespeare"

    def __init__(self, settings: LMSettings) -> None:
        self.settings = settings
        self._data: Optional[Tuple[torch.Tensor, List[torch.Tensor]]] = None

    def unavailable(self) -> Optional[str]:
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed (pip install 'flashfn[bench]')"
        return None

    # -- pieces
    def _load(self) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if self._data is None:
            from ..data import byte_splits, held_out_batches

            s = self.settings
            train, val = byte_splits(self._corpus())
            batches = held_out_batches(val, s.seq_len, s.batch_size, s.eval_batches)
            self._data = (train, [b["input_ids"] for b in batches])
        return self._data

    def build_model(self) -> nn.Module:
        """A freshly initialised model (call ``torch.manual_seed`` first for a given init)."""
        from transformers import GPT2Config, GPT2LMHeadModel

        s = self.settings
        config = GPT2Config(vocab_size=256, n_positions=s.seq_len, n_embd=s.n_embd, n_layer=s.n_layer,
                            n_head=s.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config)

    def _corpus(self) -> bytes:
        """The training text (held-out: its last 10%)."""
        from ..data import load_corpus

        return load_corpus()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Mean next-byte cross-entropy over the fixed held-out batches."""
        _, batches = self._load()
        was = model.training
        model.eval()
        total = 0.0
        for ids in batches:
            logits = model(input_ids=ids).logits
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           ids[:, 1:].reshape(-1)))
        model.train(was)
        return total / len(batches)

    def run(self, variant: str, seed: int, lr: float, *, steps: Optional[int] = None,
            progress: Progress = None) -> RunResult:
        """Train one variant with one seed; returns its :class:`RunResult`."""
        from transformers import Trainer, TrainingArguments
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from ..adapters.callback import FlashModeCallback
        from ..data import ByteLMDataset

        s = self.settings
        steps = int(steps or s.steps)
        train, _ = self._load()
        cfg = variant_config(variant, seed=seed, overrides=s.flash_overrides)
        torch.manual_seed(seed)
        model = self.build_model()
        dataset = ByteLMDataset(train, seq_len=s.seq_len, num_samples=steps * s.batch_size, seed=seed)
        result = RunResult(self.name, variant, seed, float(lr), steps)
        result.flash_config = cfg.to_dict() if cfg is not None else None
        flash_cb = FlashModeCallback(cfg, verbose=False) if cfg is not None else None
        probe = _make_eval_clock(self, model, flash_cb, result, eval_every=s.eval_every, max_steps=steps,
                                   record_activity=bool(cfg is not None and cfg.enable_alas), progress=progress)
        callbacks: List[Any] = ([flash_cb] if flash_cb is not None else []) + [probe]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="flashfn-bench-") as tmp:
            args = TrainingArguments(
                output_dir=tmp, max_steps=steps, per_device_train_batch_size=s.batch_size, learning_rate=lr,
                weight_decay=s.weight_decay, lr_scheduler_type="cosine", warmup_steps=s.lr_warmup(steps),
                max_grad_norm=s.max_grad_norm, optim="adamw_torch", seed=seed, data_seed=seed, use_cpu=True,
                report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0,
            )
            trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            trainer.train()
        result.wall_time = time.perf_counter() - t0
        if flash_cb is not None:
            stats = flash_cb.get_stats()
            result.flash_stats = dict(stats)
            result.box = stats.box()
            result.events = list(flash_cb.events)
            result.layer_names = list(flash_cb.lmap.names) if flash_cb.lmap is not None else []
        return result

    def _count_flops(self, pattern: Tuple[int, ...]) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        from ..func import BlockSkipper, find_layers

        s = self.settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = self.build_model()
            ids = torch.randint(0, 256, (s.batch_size, s.seq_len))
        skipper = BlockSkipper(model, find_layers(model), FlashConfig().alas_mechanism)
        try:
            skipper.set(pattern)
            with FlopCounterMode(display=False) as counter:
                model(input_ids=ids, labels=ids).loss.backward()
        finally:
            skipper.remove()
        return counter.get_total_flops()


@functools.cache
def _eval_clock_class() -> type:
    """The ``TrainerCallback`` subclass (built on first use, so importing this module needs no transformers)."""
    from transformers import TrainerCallback

    class EvalClockCallback(TrainerCallback):
        """Times the training steps, pausing the clock while it evaluates every ``eval_every`` steps.

        Placed after ``FlashModeCallback`` in ``callbacks``, so its hooks run
        after Flash Mode's: the skipped layers are read at ``on_step_begin``
        (after the plan is made) and the evaluation happens after Flash Mode's
        ``on_step_end`` (outside Flash Mode's own step timer too).
        """

        def __init__(self, workload: ShakespeareLM, model: nn.Module, flash_cb: Any, result: RunResult, *,
                     eval_every: int, max_steps: int, record_activity: bool, progress: Progress) -> None:
            self.workload = workload
            self.model = model
            self.flash_cb = flash_cb
            self.result = result
            self.eval_every = int(eval_every)
            self.max_steps = int(max_steps)
            self.record_activity = record_activity
            self.progress = progress
            self.clock = _Clock()
            self._pattern: Tuple[int, ...] = ()
            self._last_step = 0

        def _evaluate(self, step: int) -> None:
            loss = self.workload.evaluate(self.model)
            self.result.curve.append({"step": int(step), "time": self.clock.elapsed, "loss": loss})
            cb = self.flash_cb
            if self.record_activity and cb is not None and cb.state is not None:
                self.result.activity.append({"step": int(step), "activity": [float(a) for a in
                                                                             cb.state.alas.activity]})
            if self.progress is not None and step > self._last_step:
                self.progress(step - self._last_step)
            self._last_step = step

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._evaluate(0)
            self.clock.start()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            cb = self.flash_cb
            if cb is not None and cb.lmap is not None and len(cb.lmap):
                self._pattern = tuple(i for i, name in enumerate(cb.lmap.names)
                                      if not cb.should_compute_backward(name))
            else:
                self._pattern = ()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.result.patterns.append(self._pattern)
            step = int(state.global_step)
            if step % self.eval_every == 0 or step >= self.max_steps:
                self.clock.pause()
                self._evaluate(step)
                self.clock.start()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.clock.pause()

    return EvalClockCallback


def _make_eval_clock(*args: Any, **kwargs: Any) -> Any:
    """An ``EvalClockCallback`` (see :func:`_eval_clock_class`)."""
    return _eval_clock_class()(*args, **kwargs)


# Code fine-tune: the Shakespeare GPT-2, pretrained, fine-tuned on Python source
# --------------------------------------------------------------------------- #


@dataclass
class FinetuneSettings(LMSettings):
    """The Shakespeare workload's model and run, plus the pretraining that precedes the fine-tune."""

    pretrain_steps: int = 1200
    pretrain_lr: float = 2e-3
    corpus_bytes: int = 1_000_000
    lr: float = 5e-4
    lr_grid: Tuple[float, ...] = (2.5e-4, 5e-4, 1e-3, 2e-3)


FINETUNE_PRESETS: Dict[str, FinetuneSettings] = {
    "full": FinetuneSettings(),
    "quick": FinetuneSettings(steps=300, eval_every=25, eval_batches=4, pretrain_steps=300),
    "smoke": FinetuneSettings(steps=40, eval_every=10, eval_batches=2, batch_size=8, seq_len=32, n_layer=3,
                              n_embd=32, n_head=2, pretrain_steps=20, corpus_bytes=200_000,
                              flash_overrides={"warmup_steps": 10, "honest_check_every": 5, "log_every": 10}),
}


def load_code_corpus(limit: int = 1_000_000) -> bytes:
    """Python source code: the running interpreter's own standard-library modules (top level, sorted), ``limit`` bytes.

    Always present offline; its exact bytes depend on the Python version
    (recorded with every benchmark run).
    """
    import pathlib
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    if len(out) < 10_000:
        raise RuntimeError(f"too little Python source found in {root} for the code fine-tune workload")
    return bytes(out[:limit])


class CodeFinetuneLM(ShakespeareLM):
    """Fine-tuning a pretrained model on a new domain: the check workload (Flash Mode's defaults were not tuned on it).

    The byte-level GPT-2 of :class:`ShakespeareLM` is first pretrained on the
    embedded Shakespeare corpus (plain AdamW, ``pretrain_steps``, seed 0, once
    per process, outside every measured run), then every variant fine-tunes
    that same checkpoint on Python source code through the ``Trainer``,
    judged on held-out code.
    """

    name = "code-finetune"
    _pretrained_cache: Dict[Tuple[Any, ...], Dict[str, torch.Tensor]] = {}

    def _corpus(self) -> bytes:
        return load_code_corpus(self.settings.corpus_bytes)

    def _pretrained(self) -> Dict[str, torch.Tensor]:
        from ..data import ByteLMDataset, byte_splits, load_corpus

        s = self.settings
        key = (s.n_layer, s.n_embd, s.n_head, s.seq_len, s.batch_size, s.pretrain_steps, s.pretrain_lr)
        if key not in self._pretrained_cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = super().build_model()
                model.train()
                data = ByteLMDataset(byte_splits(load_corpus())[0], seq_len=s.seq_len,
                                     num_samples=s.pretrain_steps * s.batch_size, seed=0)
                opt = torch.optim.AdamW(model.parameters(), lr=s.pretrain_lr, weight_decay=s.weight_decay)
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, _cosine_lambda(s.lr_warmup(s.pretrain_steps), s.pretrain_steps))
                for step in range(s.pretrain_steps):
                    ids = torch.stack([data[step * s.batch_size + j]["input_ids"] for j in range(s.batch_size)])
                    model(input_ids=ids, labels=ids).loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
            self._pretrained_cache[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self._pretrained_cache[key]

    def build_model(self) -> nn.Module:
        """The pretrained model (the same weights for every variant and seed)."""
        model = super().build_model()
        model.load_state_dict(self._pretrained())
        return model


# --------------------------------------------------------------------------- #
# Fashion-MNIST: residual MLP through a custom torch.func loop
# --------------------------------------------------------------------------- #


@dataclass
class MLPSettings(TrainSettings):
    """Sizes and hyper-parameters of the Fashion-MNIST workload."""

    eval_samples: int = 10000
    batch_size: int = 128
    width: int = 256
    hidden: int = 512
    n_blocks: int = 6
    lr: float = 3e-4
    lr_grid: Tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)
    root: Optional[str] = None


MLP_PRESETS: Dict[str, MLPSettings] = {
    "full": MLPSettings(),
    "quick": MLPSettings(steps=300, eval_every=25, eval_samples=2000),
    "smoke": MLPSettings(steps=40, eval_every=10, eval_samples=500, batch_size=32, width=32, hidden=64, n_blocks=3,
                         flash_overrides={"warmup_steps": 10, "honest_check_every": 5, "log_every": 10}),
}


class ResidualBlock(nn.Module):
    """``x + W2 gelu(W1 LayerNorm(x))``: a pre-norm residual MLP block."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """Input projection, an ``nn.ModuleList`` of identical :class:`ResidualBlock` (ALAS's layers), norm and head."""

    def __init__(self, n_in: int = 784, width: int = 256, hidden: int = 512, n_blocks: int = 6,
                 n_classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList([ResidualBlock(width, hidden) for _ in range(n_blocks)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class FashionMLP(Workload):
    """Residual MLP on Fashion-MNIST, trained by a ``torch.func`` loop with Flash Mode's functional API.

    Args:
        settings: an :class:`MLPSettings` (``root``: where the idx files are;
            the Debian package ``dataset-fashion-mnist`` location by default).
    """

    name = "fashion"

    def __init__(self, settings: MLPSettings) -> None:
        self.settings = settings
        self._data: Optional[Dict[str, torch.Tensor]] = None

    def _root(self) -> str:
        from ..data import FASHION_MNIST_DIR

        return self.settings.root or FASHION_MNIST_DIR

    def unavailable(self) -> Optional[str]:
        from ..data import fashion_mnist_available

        root = self._root()
        if not fashion_mnist_available(root):
            return (f"Fashion-MNIST not found in {root}: install it with `apt-get install dataset-fashion-mnist` "
                    "(Debian/Ubuntu; MIT-licensed idx files) or pass --fashion-root DIR holding the four idx .gz "
                    "files")
        return None

    def _load(self) -> Dict[str, torch.Tensor]:
        if self._data is None:
            from ..data import load_fashion_mnist

            (xtr, ytr), (xte, yte) = load_fashion_mnist(self._root())
            mean, std = xtr.mean(), xtr.std()
            n = min(self.settings.eval_samples, xte.shape[0])
            self._data = {"xtr": (xtr - mean) / std, "ytr": ytr, "xte": ((xte - mean) / std)[:n], "yte": yte[:n]}
        return self._data

    def build_model(self) -> ResidualMLP:
        """A freshly initialised model (call ``torch.manual_seed`` first for a given init)."""
        s = self.settings
        return ResidualMLP(784, s.width, s.hidden, s.n_blocks, 10)

    def data_order(self, seed: int, steps: int) -> torch.Tensor:
        """The training-sample indices of a run: seeded epochs of permutations, ``steps * batch_size`` long."""
        n = self._load()["xtr"].shape[0]
        need = steps * self.settings.batch_size
        gen = torch.Generator().manual_seed(int(seed))
        chunks = [torch.randperm(n, generator=gen) for _ in range(-(-need // n))]
        return torch.cat(chunks)[:need]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Tuple[float, float]:
        """Held-out (test-split) mean cross-entropy and accuracy."""
        d = self._load()
        was = model.training
        model.eval()
        logits = model(d["xte"])
        model.train(was)
        return float(F.cross_entropy(logits, d["yte"])), float((logits.argmax(-1) == d["yte"]).float().mean())

    def _per_sample_loss(self, model: nn.Module) -> Callable[..., torch.Tensor]:
        from torch.func import functional_call

        def per_sample_loss(params: Dict[str, torch.Tensor], buffers: Dict[str, torch.Tensor],
                            batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(functional_call(model, (params, buffers), (x,)), y, reduction="none")

        return per_sample_loss

    def run(self, variant: str, seed: int, lr: float, *, steps: Optional[int] = None,
            progress: Progress = None) -> RunResult:
        """Train one variant with one seed; returns its :class:`RunResult`."""
        from torch.func import grad

        from ..adapters.stats import FlashStats, StepTimer
        from ..core.flash import plan_step
        from ..core.pruning import memory_init, memory_update, prune_samples
        from ..core.stepback import step_back_messages
        from ..func import (
            BlockSkipper,
            apply_gradients,
            find_layers,
            finish_step,
            flash_init_for,
            gca_after_step,
            masked_value_and_grad,
        )

        s = self.settings
        steps = int(steps or s.steps)
        d = self._load()
        cfg = variant_config(variant, seed=seed, overrides=s.flash_overrides)
        torch.manual_seed(seed)
        model = self.build_model()
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        order = self.data_order(seed, steps)
        opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_lambda(s.lr_warmup(steps), steps))
        per_sample_loss = self._per_sample_loss(model)
        result = RunResult(self.name, variant, seed, float(lr), steps)
        result.flash_config = cfg.to_dict() if cfg is not None else None

        lmap = skipper = state = timer = snapshot = memory = None
        # InfoBatch-style pruning (FlashConfig.prune_ratio > 0): off for the last 12.5% of the steps (annealing)
        prune_until = int(0.875 * steps)
        if cfg is not None:
            lmap = find_layers(model, cfg.layers)
            result.layer_names = list(lmap.names)
            skipper = BlockSkipper(model, lmap, cfg.alas_mechanism) if cfg.enable_alas else None
            state = flash_init_for(model, lmap, params, cfg=cfg)
            if cfg.prune_ratio > 0:
                memory = memory_init(d["xtr"].shape[0])
            timer = StepTimer()

        def mean_loss(p: Dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
            return per_sample_loss(p, buffers, batch).mean()

        plain_grad = grad(mean_loss)
        clock = _Clock()
        last = 0

        def evaluate(step: int) -> None:
            nonlocal last
            loss, acc = self.evaluate(model)
            result.curve.append({"step": step, "time": clock.elapsed, "loss": loss, "accuracy": acc})
            if cfg is not None and cfg.enable_alas:
                result.activity.append({"step": step, "activity": [float(a) for a in state.alas.activity]})
            if progress is not None and step > last:
                progress(step - last)
            last = step

        t_wall = time.perf_counter()
        evaluate(0)
        try:
            for step in range(1, steps + 1):
                clock.start()
                t0 = time.perf_counter()
                idx = order[(step - 1) * s.batch_size: step * s.batch_size]
                decision = None
                if cfg is None:
                    batch = (d["xtr"][idx], d["ytr"][idx])
                    grads = plain_grad({k: v.detach() for k, v in params.items()}, batch)
                    pattern: Tuple[int, ...] = ()
                else:
                    plan = plan_step(state, cfg)
                    sample_w = None
                    if memory is not None and plan.active and step <= prune_until:
                        keep, sample_w, memory = prune_samples(memory, idx, prune_ratio=cfg.prune_ratio,
                                                               seed=cfg.seed, step=step)
                        idx = idx[keep]
                        result.batch_fraction.append(idx.numel() / s.batch_size)
                    elif memory is not None:
                        result.batch_fraction.append(1.0)
                    batch = (d["xtr"][idx], d["ytr"][idx])
                    grads, loss, aux = masked_value_and_grad(
                        per_sample_loss, params, buffers, batch, lmap=lmap, plan=plan, skipper=skipper,
                        min_sample_weight=cfg.min_sample_weight, low_loss_threshold=cfg.low_loss_threshold,
                        sample_weights=sample_w, normaliser=None if memory is None else float(s.batch_size))
                    if memory is not None:
                        memory = memory_update(memory, idx, aux.losses)
                    before = state.stepback
                    state, grads, decision = finish_step(state, cfg, plan, lmap, params, grads, loss, aux.weights,
                                                         optimizer=opt)
                    result.events.extend(step_back_messages(before, state.stepback, cfg))
                    pattern = plan.skipped
                apply_gradients(params, grads)
                if s.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None],
                                                   s.max_grad_norm)
                opt.step()
                if decision is not None:  # GCA acts on the gradients still in place, before they are cleared
                    snapshot = gca_after_step(decision, params, opt, snapshot)
                sched.step()
                opt.zero_grad(set_to_none=True)
                if timer is not None:
                    timer.add(time.perf_counter() - t0, skipped_any=bool(pattern))
                clock.pause()
                result.patterns.append(pattern)
                if step % s.eval_every == 0 or step == steps:
                    evaluate(step)
        finally:
            if skipper is not None:
                skipper.remove()
        result.wall_time = time.perf_counter() - t_wall
        if cfg is not None:
            stats = FlashStats.compute(state, timer, sum(p.numel() for p in params.values()))
            result.flash_stats = dict(stats)
            if memory is not None:
                result.flash_stats["samples_pruned"] = int(memory.pruned)
                result.flash_stats["samples_kept_when_pruning"] = int(memory.kept)
            result.box = stats.box()
        return result

    def _count_flops(self, pattern: Tuple[int, ...]) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        from ..core.flash import StepPlan
        from ..func import BlockSkipper, find_layers, masked_value_and_grad

        s = self.settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = self.build_model()
            batch = (torch.randn(s.batch_size, 784), torch.randint(0, 10, (s.batch_size,)))
        lmap = find_layers(model)
        skipper = BlockSkipper(model, lmap, FlashConfig().alas_mechanism)
        compute = torch.tensor([i not in pattern for i in range(len(lmap))], dtype=torch.bool)
        plan = StepPlan(active=bool(pattern), honest=not pattern, compute=compute, weigh=False)
        try:
            with FlopCounterMode(display=False) as counter:
                masked_value_and_grad(self._per_sample_loss(model), dict(model.named_parameters()),
                                      dict(model.named_buffers()), batch, lmap=lmap, plan=plan, skipper=skipper)
        finally:
            skipper.remove()
        return counter.get_total_flops()


#: Workload name -> (class, presets).
WORKLOADS: Dict[str, Tuple[type, Dict[str, Any]]] = {
    "shakespeare": (ShakespeareLM, LM_PRESETS),
    "fashion": (FashionMLP, MLP_PRESETS),
    "code-finetune": (CodeFinetuneLM, FINETUNE_PRESETS),
}
