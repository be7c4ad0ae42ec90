"""Per-layer choice between SPON and plain TEAL, on calibration's own held-out check windows.

SPON vectors trained on one text can hurt: on the example model at 25% sparsity every bias together made
held-out perplexity worse than TEAL's. After training (biases fused, thresholds refitted with them), this step
measures perplexity on windows of the calibration text that training never saw, and greedily zeroes the
biases of groups of consecutive layers whose removal lowers it. The caller (pipeline.keep_helpful_biases) then
refits the thresholds with the biases that remain, so the achieved sparsity stays on target (TEAL and SPON
stay matched), keeps the drop only if it still helps after that refit, and falls back to TEAL's own thresholds
and no biases at all if SPON is still no better than TEAL on the check.
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_spon.calibration.evaluate import perplexity
from vllm_spon.calibration.sparse_model import SparseModel

# Layers are tried in this many groups of consecutive layers: one perplexity pass per group keeps the choice
# within calibration's 10-minute budget on 2 CPU cores (about 5 s a pass for 8 x 256 tokens), where one pass
# per layer (30 on the example model) would not.
LAYER_GROUPS = 6


@dataclass(frozen=True)
class SiteChoice:
    """What the choice kept, and the check perplexities it was made on."""

    dropped_layers: tuple[int, ...]  # layers whose biases were zeroed
    num_layers: int
    dense: float
    teal: float  # TEAL's own thresholds, no biases
    spon: float  # every bias, as trained
    chosen: float  # the biases kept, before the caller's threshold refit

    @property
    def keeps_any(self) -> bool:
        return len(self.dropped_layers) < self.num_layers

    def summary(self) -> str:
        dropped = ", ".join(map(str, self.dropped_layers)) or "none"
        return (f"check perplexity: dense {self.dense:.3f}, TEAL {self.teal:.3f}, SPON (every bias) "
                f"{self.spon:.3f}, SPON (chosen) {self.chosen:.3f}; layers whose biases were dropped: {dropped}")


def layer_groups(num_layers: int, groups: int = LAYER_GROUPS) -> list[tuple[int, ...]]:
    """`num_layers` consecutive layer indices split into at most `groups` near-equal runs."""
    groups = max(1, min(groups, num_layers))
    bounds = [round(i * num_layers / groups) for i in range(groups + 1)]
    return [tuple(range(a, b)) for a, b in itertools.pairwise(bounds) if b > a]


@torch.no_grad()
def choose_sites(
    model: SparseModel,
    check_windows: torch.Tensor,
    teal_thresholds: dict[str, float],
    spon_thresholds: dict[str, float],
    log: Callable[[str], None] = lambda _: None,
) -> SiteChoice:
    """Zero the fused biases of the layer groups whose removal lowers check perplexity; leaves the model with
    `spon_thresholds` and the chosen biases (dropped ones as zeros, the format's shape for method spon)."""
    dense = perplexity(model, check_windows, "dense")
    model.set_thresholds(teal_thresholds)
    teal = perplexity(model, check_windows, "teal")
    model.set_thresholds(spon_thresholds)
    spon = perplexity(model, check_windows, "spon")
    num_layers = len(model.decoder_layers())
    saved = dict(model.fused_biases)

    def drop(layers: set[int]) -> None:
        model.fused_biases = {n: (torch.zeros_like(b) if model.family.layer_index(n) in layers else b)
                              for n, b in saved.items()}

    def without(layers: set[int]) -> float:
        drop(layers)
        return perplexity(model, check_windows, "spon")

    # One pass per group alone, then drop the helpful ones best-first, each kept only if the drop still helps
    # together with those already dropped.
    alone = {group: without(set(group)) for group in layer_groups(num_layers)}
    dropped: set[int] = set()
    best = spon
    for group in sorted((g for g in alone if alone[g] < spon), key=alone.__getitem__):
        trial = without(dropped | set(group)) if dropped else alone[group]
        if trial < best:
            dropped, best = dropped | set(group), trial
    drop(dropped)  # its perplexity is `best`, measured above
    choice = SiteChoice(tuple(sorted(dropped)), num_layers, dense, teal, spon, best)
    log(choice.summary())
    return choice
