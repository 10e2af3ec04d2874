"""Table 6: Spearman rank correlation of each criterion with the oracle (Molchanov et al. 2017, Table 1).

A small CNN (``common.small_cnn``: 4× Conv3×3→BN→ReLU→MaxPool, then Linear)
is trained on scikit-learn's ``load_digits`` (real handwriting, upsampled to
32×32). On held-out batches, in eval mode:

- the **oracle**: ``prunable.oracle_importance`` silences each channel in turn
  and records ``|ΔL|`` (the paper's oracle-abs);
- every **criterion**: one ``Pruner`` per criterion, forward + backward passes
  over the same held-out batches inside ``pruner.estimate()`` (no weight
  update), then ``pruner.scores()`` with the criterion's ``normalize`` switched
  off (raw scores); the "L2-normalised" column divides each layer's scores by
  their L2 norm, exactly what ``Pruner`` does before a global ranking.

Correlations: **within layer** = Spearman per layer, averaged over the layers;
**across layers** = Spearman over all channels pooled (raw, and L2-normalised
per layer). Mean ± std over 3 seeds (a new base model each). The paper's
numbers (VGG-16 on Birds-200): Taylor 0.73, weight magnitude 0.27, mean
activation 0.56.

Run: ``python bench/oracle_correlation.py [--quick]``
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import fmt_mean_std, markdown_table

CHANNELS = (16, 32, 32, 64)
HELD_OUT_BATCH = 128


def criteria() -> dict[str, Callable[[], Any]]:
    from prunable import APoZ, BNScale, MeanActivation, Random, TaylorActivation, TaylorBN, TaylorWeight, WeightNorm

    return {
        "TaylorActivation (2017, Eq. 8)": TaylorActivation,
        "TaylorActivation, abs after batch mean": lambda: TaylorActivation(abs_after_batch_mean=True),
        "TaylorBN (2019)": TaylorBN,
        "TaylorWeight (2019)": TaylorWeight,
        "MeanActivation": MeanActivation,
        "APoZ (1 − APoZ)": APoZ,
        "WeightNorm(1) (L1)": lambda: WeightNorm(1),
        "WeightNorm(2) (L2)": lambda: WeightNorm(2),
        "BNScale (abs γ)": BNScale,
        "Random": lambda: Random(0),
    }


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN when either side is constant."""
    ra, rb = average_ranks(np.asarray(a, dtype=float)), average_ranks(np.asarray(b, dtype=float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def raw_scores(model: torch.nn.Module, make: Callable[[], Any], held_out: list) -> dict[str, torch.Tensor]:
    """Un-normalised per-channel scores of one criterion, estimated on ``held_out`` in eval mode."""
    from prunable import Pruner

    criterion = make()
    criterion.normalize = False
    with common.quiet():
        pruner = Pruner(model, held_out[0][0][:1], criterion=criterion)
    model.eval()
    if criterion.needs_activations or criterion.needs_grad:
        with pruner.estimate():
            for x, y in held_out:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    return pruner.scores()


def correlations(scores: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor]) -> dict[str, float]:
    from prunable.importance import l2_normalize

    ids = [g for g in oracle if g in scores]
    within = [spearman(scores[g], oracle[g]) for g in ids]
    pooled_oracle = torch.cat([oracle[g] for g in ids])
    return {
        "within": float(np.nanmean(within)) if not all(np.isnan(within)) else float("nan"),
        "across": spearman(torch.cat([scores[g] for g in ids]), pooled_oracle),
        "across_l2": spearman(torch.cat([l2_normalize(scores[g]) for g in ids]), pooled_oracle),
    }


def run_seed(seed: int, quick: bool) -> tuple[dict[str, dict[str, float]], float]:
    from prunable import oracle_importance

    train, test = common.digits(32)
    common.seed_all(seed)
    model = common.small_cnn(CHANNELS, 10)
    common.train_epochs(model, train, 6 if quick else 10, 64, seed)
    acc = common.accuracy(model, test)
    held_out = list(common.batches(test, HELD_OUT_BATCH))
    model.eval()
    oracle = oracle_importance(model, F.cross_entropy, held_out)
    return {name: correlations(raw_scores(model, make, held_out), oracle) for name, make in criteria().items()}, acc


def main(quick: bool = False) -> str:
    common.setup(0)
    seeds = (0,) if quick else (0, 1, 2)
    per_seed = [run_seed(s, quick) for s in seeds]
    rows = []
    for name in criteria():
        vals = {k: [r[name][k] for r, _ in per_seed] for k in ("within", "across", "across_l2")}
        rows.append([name] + [fmt_mean_std(vals[k], digits=2) for k in ("within", "across", "across_l2")])
    headers = ["criterion", "within layer (mean over layers)", "across layers, raw", "across layers, L2-normalised"]
    accs = ", ".join(f"{a:.1%}" for _, a in per_seed)
    note = (f"Spearman ρ against the oracle |ΔL|; CNN {list(CHANNELS)} on load_digits 32×32, base test accuracy "
            f"{accs} (seeds {list(seeds)}); held-out set of {len(common.digits(32)[1][1])} images. "
            "Paper (VGG-16, Birds-200): Taylor 0.73, weight 0.27, mean activation 0.56.")
    return f"{markdown_table(headers, rows)}\n\n{note}"


if __name__ == "__main__":
    common.run_script(main, __doc__)
