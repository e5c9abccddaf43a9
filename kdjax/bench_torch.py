"""The PyTorch side of `kdjax bench`: the same logit-distillation step in PyTorch eager with
transformers' `BertForSequenceClassification`, written the way a PyTorch user would write it.

It is an independent implementation of the `kd` recipe's step (configs/kd.py): the frozen
teacher runs under `torch.no_grad()` in eval mode, the student is a copy of the teacher with
only some of its encoder layers kept (DistilBERT's way of initialising a student), and the loss
is `ce * CE(student, labels) + soft * T^2 * KL(softmax(teacher / T) || softmax(student / T))`,
each averaged over the rows it applies to, followed by global-norm clipping and AdamW with a
linear warmup / linear decay schedule and no weight decay on biases and LayerNorm weights
(the conventions of `kdjax.optim` and benchmarks/torch_finetune.py).

torch is not a dependency of kdjax: this module is imported only by the PyTorch part of the
benchmark and by tests (`pip install torch==2.13.0`).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np

from kdjax import hf
from kdjax.models.bert import BertClassifier

TORCH_INSTALL_HINT = ("the PyTorch baseline needs torch: `pip install torch==2.13.0` (the CPU "
                      "build: add --index-url https://download.pytorch.org/whl/cpu), or run "
                      "`kdjax bench --no-torch`")


class TorchMissing(ImportError):
    """torch is not installed; the message says how to install it."""


def import_torch():
    """The torch module, or TorchMissing with the install command."""
    try:
        import torch
    except ImportError:
        raise TorchMissing(TORCH_INSTALL_HINT) from None
    return torch


def cpu_cores() -> int:
    """The cores this process may run on (what XLA's CPU thread pool uses)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not Linux.
        return os.cpu_count() or 1


def to_torch_classifier(model: BertClassifier, device: str = "cpu"):
    """A transformers `BertForSequenceClassification` holding exactly `model`'s weights.

    Built from `model`'s config with transformers' default attention implementation (recorded by
    `attention_implementation`); weights go through `hf.to_hf_tensors`, the same key map that
    `kdjax.hf.save_pretrained` writes.
    """
    torch = import_torch()
    import transformers

    label_names = [str(i) for i in range(model.num_labels)]
    config = transformers.BertConfig(**hf.hf_config_dict(model.config, label_names))
    torch_model = transformers.BertForSequenceClassification(config)
    state = {name: torch.tensor(array) for name, array in hf.to_hf_tensors(model)}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    parameters = dict(torch_model.named_parameters())
    missing = [k for k in missing if k in parameters]  # Buffers (position_ids) may be absent.
    if missing or unexpected:
        raise ValueError(f"weights do not fit BertForSequenceClassification: missing {missing}, "
                         f"unexpected {unexpected}")
    return torch_model.to(device)


def student_from_teacher(teacher, layers: tuple[int, ...]):
    """A copy of `teacher` that keeps only encoder layers `layers` (0-based): embeddings,
    pooler and classifier copied as they are."""
    student = copy.deepcopy(teacher)
    kept = [student.bert.encoder.layer[i] for i in layers]
    student.bert.encoder.layer = type(student.bert.encoder.layer)(kept)
    student.config.num_hidden_layers = len(layers)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def attention_implementation(model) -> str:
    """The attention kernel transformers picked for `model` (eager, sdpa, ...)."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def to_torch_batch(batch: dict, device: str = "cpu") -> dict:
    """A kdjax host batch (numpy) as torch tensors: ids int64, weights float32."""
    torch = import_torch()
    out = {}
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        out[key] = torch.from_numpy(np.asarray(batch[key], np.int64)).to(device)
    out["weights"] = torch.from_numpy(np.asarray(batch["weights"], np.float32)).to(device)
    return out


@dataclasses.dataclass(frozen=True)
class TorchKDConfig:
    """The loss and optimizer of the step (configs/kd.py's values by default)."""

    ce: float = 0.5
    soft: float = 0.5
    temperature: float = 2.0
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    total_steps: int = 1000


class TorchKDStep:
    """One student update per call: teacher forward (no grad) -> loss -> backward -> clip ->
    AdamW -> schedule step.

    Args:
      teacher, student: transformers classifiers on the same device.
      config: loss weights, temperature and optimizer settings.
      dropout: train the student with dropout (train mode); False runs it in eval mode, which
        makes the loss deterministic (for comparing with kdjax).
      autocast_dtype: a torch dtype for `torch.autocast` (bfloat16), or None for float32.
    """

    def __init__(self, teacher, student, config: TorchKDConfig, *, dropout: bool = True,
                 autocast_dtype=None):
        torch = import_torch()
        self.torch = torch
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = student.train(dropout)
        self.config = config
        self.autocast_dtype = autocast_dtype
        self.device_type = next(student.parameters()).device.type
        no_decay = ("bias", "LayerNorm.weight")
        named = list(student.named_parameters())
        groups = [
            {"params": [p for n, p in named if not n.endswith(no_decay)],
             "weight_decay": config.weight_decay},
            {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.b1, config.b2),
                                           eps=config.eps)
        # kdjax.optim.warmup_linear_decay: 0 -> peak over the warmup steps, then linearly to 0.
        warmup = int(round(config.warmup_ratio * config.total_steps))
        decay = max(config.total_steps - warmup, 1)

        def factor(step):
            if step < warmup:
                return step / warmup
            return max(0.0, 1.0 - (step - warmup) / decay)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def _autocast(self):
        if self.autocast_dtype is None:
            import contextlib
            return contextlib.nullcontext()
        return self.torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def loss(self, batch: dict):
        """(scalar loss, student logits) for a torch batch (see `to_torch_batch`)."""
        torch, cfg = self.torch, self.config
        F = torch.nn.functional
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        with self._autocast():
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits.float()
            student_logits = self.student(**inputs).logits.float()
        rows, labels = batch["weights"], batch["labels"]
        labelled = rows * (labels >= 0)
        ce = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
        t = cfg.temperature
        teacher_probs = F.softmax(teacher_logits / t, dim=-1)
        kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), teacher_probs,
                      reduction="none").sum(-1) * t * t
        loss = (cfg.ce * (ce * labelled).sum() / labelled.sum().clamp(min=1.0)
                + cfg.soft * (kl * rows).sum() / rows.sum().clamp(min=1.0))
        return loss, student_logits

    def __call__(self, batch: dict):
        """One update; returns the loss before it (a detached tensor, no host sync)."""
        loss, _ = self.loss(batch)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
