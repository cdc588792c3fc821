"""Trial-to-trial reliability of each unit's validation responses (numpy only).

Two figures users compute from the val single trials (``nat4-dataset.md``, "Trial
reliability metrics"):

- **TTRC**: the mean Pearson r over all pairs of trials.
- **CCmax** (the noise ceiling): ``sqrt(2 / (1 + 1 / rho_half))``, where ``rho_half`` is
  the mean Pearson r between the PSTHs of two halves of the trials.

A unit's trial is its responses to every val sound, one after the other; a trial index
counts only if the unit has it for every val sound (a site that played one sound fewer
times gives that many fewer whole trials), and only bins every kept trial has are used. The old reference split trials with the first
126 lexicographic half-splits, which all share trials 0-6; here every split is drawn at
random from a generator seeded by ``(seed, cell)``, so a unit's figures depend on the seed
and on nothing else (not on which other units were asked for). Pairs or splits whose r is
undefined (a trial or PSTH that never changes) are left out of the means; a unit with fewer
than two whole trials gets NaN, as does a ``rho_half`` of 0 or below for CCmax.
"""

from __future__ import annotations

import numpy as np

#: as many random half-splits as the old reference's 126 lexicographic ones
DEFAULT_SPLITS = 126


def whole_trials(val: np.ndarray) -> np.ndarray:
    """One unit's val trials ``(S, R, T)`` -> ``(R', T')``: the trials it has for every
    sound, each the sounds one after the other, over the bins every one of them has (a
    presentation a sample short leaves its last bin NaN: that bin goes, not the trial)."""
    present = ~np.isnan(val).all(axis=2).any(axis=0)  # (R,): no sound missing
    n_sounds, _, n_bins = val.shape
    kept = val[:, present, :].transpose(1, 0, 2).reshape(int(present.sum()), n_sounds * n_bins)
    return kept[:, ~np.isnan(kept).any(axis=0)]


def ttrc(trials: np.ndarray) -> float:
    """Mean Pearson r over all pairs of rows of ``trials`` (R, T); NaN for R < 2."""
    if len(trials) < 2:
        return float("nan")
    r = _pearson_rows(trials)
    upper = r[np.triu_indices(len(trials), k=1)]
    return _nanmean(upper)


def rho_half(trials: np.ndarray, rng: np.random.Generator, n_splits: int) -> float:
    """Mean Pearson r between the means of two random halves of the rows (R // 2 each; one
    row is left out of each split when R is odd); NaN for R < 2. Split ``i`` is row ``i``
    of ``rng.permuted`` applied to ``n_splits`` copies of ``0 .. R-1``."""
    n = len(trials)
    if n < 2:
        return float("nan")
    half = n // 2
    order = rng.permuted(np.tile(np.arange(n), (n_splits, 1)), axis=1)
    split = np.arange(n_splits)[:, None]
    a = np.zeros((n_splits, n))
    b = np.zeros((n_splits, n))
    a[split, order[:, :half]] = 1.0 / half
    b[split, order[:, half : 2 * half]] = 1.0 / half
    # The halves' PSTHs are a @ trials and b @ trials; their covariances over time come
    # from the trials' own (R x R) one, so no PSTH is ever formed: R^2 per split, not T.
    gram = _centred_gram(trials)
    ag, bg = a @ gram, b @ gram
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ag * b).sum(axis=1) / np.sqrt((ag * a).sum(axis=1) * (bg * b).sum(axis=1))
    return _nanmean(r)


def ccmax(rho: float) -> float:
    """``sqrt(2 / (1 + 1 / rho_half))``; NaN unless ``rho_half`` > 0."""
    if not rho > 0:
        return float("nan")
    return float(np.sqrt(2.0 / (1.0 + 1.0 / rho)))


def unit_reliability(
    val: np.ndarray, *, cell: int, seed: int, n_splits: int = DEFAULT_SPLITS
) -> dict:
    """TTRC, rho_half and CCmax of one unit from its val trials ``(S, R, T)``."""
    trials = whole_trials(val).astype(np.float64)
    rng = np.random.default_rng([seed, cell])
    rho = rho_half(trials, rng, n_splits)
    return {
        "n_trials": len(trials),
        "ttrc": ttrc(trials),
        "rho_half": rho,
        "ccmax": ccmax(rho),
    }


def _pearson_rows(x: np.ndarray) -> np.ndarray:
    """Pearson r between every two rows; NaN where a row is constant."""
    gram = _centred_gram(x)
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        return gram / np.outer(norms, norms)


def _centred_gram(x: np.ndarray) -> np.ndarray:
    """Sums of products over time of the rows, each less its own mean: (R, R)."""
    centred = x - x.mean(axis=1, keepdims=True)
    return centred @ centred.T


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")
