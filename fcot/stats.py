"""Uncertainty for every accuracy fcot reports: bootstrap intervals, paired differences, and the baselines a
number must beat (the majority answer, random guessing), plus whether a student answers one thing only.

All intervals are 95% percentile bootstrap intervals over questions (2,000 resamples, seeded, so a report is
the same every time it is built). Sweep points repeated over seeds resample seeds and questions together.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

RESAMPLES = 2000
COLLAPSE_SHARE = 0.9  # a student whose predictions are one answer for >= 90% of the questions is "collapsed"


BOOTSTRAP_ELEMENTS = 1 << 22  # resampled indices drawn at a time: 32 MB, whatever the number of questions


def _resampled_means(values: list[np.ndarray], resamples: int, seed: int) -> list[np.ndarray]:
    """The mean of each array (same length) in each of `resamples` bootstrap resamples of its positions, drawn
    together. The draws come a few rows at a time: one (resamples x n) index matrix of 20,000 questions is
    320 MB. Drawing the rows in parts gives the same numbers as drawing them at once."""
    n = values[0].size
    rng = np.random.default_rng(seed)
    means: list[list] = [[] for _ in values]
    rows = max(1, BOOTSTRAP_ELEMENTS // n)
    for start in range(0, resamples, rows):
        idx = rng.integers(0, n, size=(min(rows, resamples - start), n))
        for out, x in zip(means, values):
            out.append(x[idx].mean(axis=1))
    return [np.concatenate(m) for m in means]


def accuracy_interval(correct, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean of 0/1 `correct`."""
    x = np.asarray(correct, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    [means] = _resampled_means([x], resamples, seed)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(a, b, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean(a) - mean(b), 95% interval) for 0/1 outcomes of two methods on the same questions, resampling
    questions (pairs) together."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError("paired_difference needs outcomes of both methods on the same questions")
    mx, my = _resampled_means([x, y], resamples, seed)
    lo, hi = np.percentile(mx - my, [2.5, 97.5])
    return float(x.mean() - y.mean()), float(lo), float(hi)


def seeds_interval(per_seed: list, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 95% interval) of accuracy over training seeds (each a 0/1 vector over the same questions):
    each resample draws seeds and questions with replacement."""
    m = np.asarray(per_seed, dtype=float)  # seeds x questions
    rng = np.random.default_rng(seed)
    s = rng.integers(0, m.shape[0], size=(resamples, m.shape[0]))
    q = rng.integers(0, m.shape[1], size=(resamples, m.shape[1]))
    means = np.array([m[s[i]][:, q[i]].mean() for i in range(resamples)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(m.mean()), float(lo), float(hi)


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a rate over n samples (where only the rate is kept, e.g. a teacher's samples; they
    are not independent across the samples of one question, so it is a lower bound on the noise)."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def most_frequent(values: list) -> tuple:
    """The most frequent value and its share: of gold answers, the accuracy of always giving it (the majority
    baseline); of predictions (None: no answer found), how collapsed a student is."""
    value, count = Counter(values).most_common(1)[0]
    return value, count / len(values)


def random_guess(answer_type: str, choices: list) -> float | None:
    """Expected accuracy of a uniform guess among the choices (yes/no: 1/2); None where answers are open."""
    if answer_type == "yes_no":
        return 0.5
    if answer_type == "letter" and choices and all(choices):
        return float(np.mean([1 / len(c) for c in choices]))
    return None


def fmt_acc(acc: float | None, interval=None) -> str:
    """`55.3% [47.3, 63.3]`."""
    if acc is None:
        return "—"
    if interval is None:
        return f"{100 * acc:.1f}%"
    return f"{100 * acc:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def fmt_diff(diff: float, lo: float, hi: float) -> str:
    return f"{100 * diff:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]"
