"""SPON training: learn one input-independent vector per sparsified linear by KL distillation.

The model is frozen; the dense model (same weights, mode "dense"; its unquantized weights where the student's
are rounded to fp8, so the biases compensate quantization error too) is the teacher and the thresholded model
plus vectors is the student. The loss is KL(p_dense || p_sparse) over the final logits of every position.
Input-space vectors `a` (the paper's) are added after thresholding; output-space vectors `c` are added to the
linear's output. Both fuse to the same bias (`W a` or `c`), so they differ only in optimisation geometry.
With `hidden_weight` > 0 the loss also aligns the student's residual stream with the teacher's after every
decoder layer (the paper's representational-alignment view): a signal at every depth, not only at the logits.
With `vector_decay` > 0 the loss also holds `vector_decay` times the sum of the vectors' squared L2 norms (an L2
penalty toward zero, i.e. toward plain TEAL): biases that fit the calibration text less closely.
"""

import itertools
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vllm_spon.calibration.devices import free_memory_bytes
from vllm_spon.calibration.sparse_model import SparseModel
from vllm_spon.format.schema import BiasSpace

Precision = Literal["fp32", "bf16"]

# Training starts from zero vectors, i.e. from TEAL's own KL: a loss this many times above the first step's
# means the vectors made the model far worse than no training (a too-large learning rate), not noise.
DIVERGENCE_FACTOR = 10.0


class TrainingError(RuntimeError):
    """SPON training diverged (non-finite or exploding loss) or hurt held-out perplexity: nothing is written."""


def check_loss(loss: float, first: float | None, step: int, lr: float) -> None:
    """Stop at a non-finite loss, or one far above the first step's (training that diverges)."""
    diverged = first is not None and loss > DIVERGENCE_FACTOR * max(first, 1e-4)
    if not math.isfinite(loss) or diverged:
        what = f"became {loss}" if not math.isfinite(loss) else f"rose from {first:.4g} to {loss:.4g}"
        raise TrainingError(
            f"SPON training diverged: the KL loss {what} at step {step}; lower --lr (now {lr:g}; default 1e-3) "
            "or check the model for NaN weights. Nothing was written."
        )


@dataclass(frozen=True)
class TrainConfig:
    # 300 steps of one window: better on held-out text than 100 of two (two seeds); 269-305 s of training on the
    # earlier machine's 2 cores, 359-422 s on an AMD EPYC's; 240 steps lost at 25% (benchmarks/RESULTS.md)
    steps: int = 300
    lr: float = 1e-3
    windows_per_step: int = 1
    bias_space: BiasSpace = "output"
    seed: int = 0
    # bf16 autocast roughly halves step time on CPUs with AVX512-BF16 and on GPUs; vectors stay float32.
    precision: Precision = "fp32"
    # Cosine decay to a tenth of `lr`: large early steps, a settled finish.
    schedule: Literal["constant", "cosine"] = "constant"
    # Weight of `hidden_alignment` added to the KL (0: logits only, no hidden states kept).
    hidden_weight: float = 0.0
    # Equal rounds of steps; `train_spon`'s `between_rounds` runs after each but the last (a threshold refit).
    rounds: int = 1
    # Weight of the L2 penalty sum_v ||v||^2 over every SPON vector added to the loss (0: none).
    vector_decay: float = 0.0


def kl_dense_to_sparse(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(student)), in float32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


def vector_penalty(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over SPON vectors of their squared L2 norms, in float32."""
    return torch.stack([p.float().pow(2).sum() for p in params]).sum()


def hidden_alignment(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and positions of ||h_student - h_teacher||^2 / ||h_teacher||^2 on each decoder layer's
    output (the embeddings, equal in both, skipped). Normalised per token, so neither the deep layers' larger
    residual stream nor the first token's massive activations dominate."""
    terms = [((s.float() - t.float()).pow(2).sum(-1) / t.float().pow(2).sum(-1).clamp_min(1e-6)).mean()
             for t, s in zip(teacher[1:], student[1:], strict=True)]
    return torch.stack(terms).mean()


def distillation_loss(model: SparseModel, batch: torch.Tensor, config: TrainConfig, params: Sequence[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, its KL term) of one step on `batch`: the dense teacher (unquantized weights) against the student."""
    hidden = config.hidden_weight > 0
    with torch.no_grad(), model.use("dense"), model.unquantized():
        teacher, teacher_hidden = model.logits_and_hidden(batch, hidden)
    with model.use("spon"):
        student, student_hidden = model.logits_and_hidden(batch, hidden)
    kl = kl_dense_to_sparse(teacher, student)
    loss = kl + config.hidden_weight * hidden_alignment(teacher_hidden, student_hidden) if hidden else kl
    if config.vector_decay > 0:
        loss = loss + config.vector_decay * vector_penalty(params)
    return loss, kl


def bf16_copies_fit(model: SparseModel, device: torch.device, log: Callable[[str], None]) -> bool:
    """Whether bf16 training computes with bf16 copies of the block weights (`SparseModel.weights_in`: the same
    results, about 8% less time a step): where they take at most half the free memory; else autocast casts the
    weights on every call."""
    needed, free = model.block_weight_bytes(torch.bfloat16), free_memory_bytes(device)
    if needed > free // 2:
        log(f"bf16 training casts the weights on every call: copies would take {needed / 2**30:.2f} GiB of "
            f"{free / 2**30:.2f} GiB free on {device}")
        return False
    log(f"bf16 training: block weights copied to bf16 once ({needed / 2**30:.2f} GiB)")
    return True


def train_spon(
    model: SparseModel,
    windows: torch.Tensor,
    config: TrainConfig,
    log: Callable[[str], None] = lambda _: None,
    between_rounds: Callable[[], object] | None = None,
) -> list[float]:
    """Train SPON vectors on `windows` ([N, window] token ids); leaves them on `model`, unfused.

    `between_rounds` (if given) runs after each of `config.rounds` equal rounds but the last, with the vectors in
    place: the pipeline refits the thresholds there, so later rounds train against the thresholds the biases
    will be served with. One optimizer and one data order run through all rounds.
    """
    params = model.init_vectors(config.bias_space)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, config.steps), eta_min=config.lr / 10)
                 if config.schedule == "cosine" else None)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.model.parameters()).device
    order = torch.randperm(len(windows), generator=generator)
    cursor, losses = 0, []
    hidden = config.hidden_weight > 0
    extra = hidden or config.vector_decay > 0  # the loss is more than the KL
    bounds = [config.steps * k // config.rounds for k in range(config.rounds + 1)]
    bf16 = config.precision == "bf16"
    copies = bf16 and bf16_copies_fit(model, device, log)
    start = time.perf_counter()
    with tqdm(total=config.steps, desc=f"SPON training ({config.bias_space} space)", leave=False) as bar:
        for round_start, round_end in itertools.pairwise(bounds):
            with model.weights_in(torch.bfloat16) if copies else nullcontext():
                for step in range(round_start, round_end):
                    if cursor + config.windows_per_step > len(order):
                        order, cursor = torch.randperm(len(windows), generator=generator), 0
                    batch = windows[order[cursor: cursor + config.windows_per_step]].to(device)
                    cursor += config.windows_per_step
                    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                        loss, kl = distillation_loss(model, batch, config, params)
                    value = loss.item()
                    check_loss(value, losses[0] if losses else None, step, config.lr)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    losses.append(value)
                    bar.update()
                    bar.set_postfix(kl=f"{kl.item():.4f}", **({"loss": f"{losses[-1]:.4f}"} if extra else {}))
            if between_rounds is not None and round_end < config.steps:
                between_rounds()  # outside the copies: the refit's float32 passes read the model's own weights
    terms = ["KL"] + ["hidden term"] * hidden + ["vector decay"] * (config.vector_decay > 0)
    what = f"loss ({' + '.join(terms)})" if extra else "KL"
    rounds = f" ({config.rounds} rounds, thresholds refitted between)" if config.rounds > 1 and between_rounds else ""
    log(f"SPON training: {config.steps} steps{rounds} in {time.perf_counter() - start:.0f} s, "
        f"{what} {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of last 10), "
        f"sum of squared vector norms {vector_penalty(params).item():.4g}"
        if losses else "SPON training: 0 steps")
    return losses
