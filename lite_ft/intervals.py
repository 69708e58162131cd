"""How sure a score is: 95% intervals over the evaluated examples, and paired differences between two models.

Each task's scores are recomputed from per-example columns (a QA example's EM and F1, a classification example's
prediction and label, an instruction example's loss sum and token count), so a bootstrap resample of examples
gives the score exactly as the task computes it, macro F1 and token-weighted losses included. Accuracy and exact
match, means of 0/1 values, get Wilson's interval (closed form, close to nominal coverage even at small n); the
other scores a percentile bootstrap. Everything is seeded: the same records give the same intervals.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lite_ft.metrics import exact_match, token_f1

LEVEL = 0.95
SAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under 0.5 points between seeds at n >= 40
SEED = 0
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
WILSON = ("accuracy", "exact_match")  # scores that are 100 x a mean of 0/1 values

Columns = dict[str, np.ndarray]
Statistic = Callable[[Columns], np.ndarray]  # columns of shape (resamples, n) -> one score per resample


def columns(task: str, records: list[dict[str, Any]]) -> Columns:
    """The per-example values a task's scores are computed from, one array entry per prediction record."""
    if task == "qa":
        return {"exact_match": np.array([100.0 * max(exact_match(r["prediction"], a) for a in r["references"])
                                         for r in records]),
                "f1": np.array([100.0 * max(token_f1(r["prediction"], a) for a in r["references"])
                                for r in records])}
    if task == "classification":
        return {"prediction": np.array([r["prediction"] for r in records], dtype=np.int64),
                "label": np.array([r["label"] for r in records], dtype=np.int64)}
    if task == "instruction":
        return {"loss_sum": np.array([r["loss_sum"] for r in records], dtype=np.float64),
                "tokens": np.array([r["response_tokens"] for r in records], dtype=np.float64)}
    raise ValueError(f"no per-example scores for task {task!r}")


def _mean(key: str) -> Statistic:
    return lambda c: c[key].mean(axis=-1)


def _accuracy(c: Columns) -> np.ndarray:
    return 100.0 * (c["prediction"] == c["label"]).mean(axis=-1)


def _macro_f1(c: Columns) -> np.ndarray:
    """Macro F1 over the classes present in each resample's labels or predictions (as metrics.py computes it)."""
    pred, label = c["prediction"], c["label"]
    total = np.zeros(pred.shape[:-1])
    present = np.zeros(pred.shape[:-1])
    for k in np.union1d(np.unique(pred), np.unique(label)):
        tp = ((pred == k) & (label == k)).sum(-1)
        fp = ((pred == k) & (label != k)).sum(-1)
        fn = ((pred != k) & (label == k)).sum(-1)
        seen = (tp + fp + fn) > 0
        total += np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        present += seen
    return 100.0 * total / np.maximum(present, 1)


def _loss(c: Columns) -> np.ndarray:
    return c["loss_sum"].sum(-1) / np.maximum(c["tokens"].sum(-1), 1)


STATISTICS: dict[str, dict[str, Statistic]] = {
    "qa": {"exact_match": _mean("exact_match"), "f1": _mean("f1")},
    "classification": {"accuracy": _accuracy, "macro_f1": _macro_f1},
    "instruction": {"loss": _loss, "perplexity": lambda c: np.exp(np.minimum(_loss(c), 50.0))},
}


def resamples(n: int, seed: int = SEED, samples: int = SAMPLES) -> np.ndarray:
    """Bootstrap indices, shape (samples, n): each row draws n examples with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def percentile(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion, in percent."""
    if n == 0:
        return 0.0, 100.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(centre - half, 0.0), 100.0 * min(centre + half, 1.0)


def bootstrap(statistic: Statistic, cols: Columns, seed: int = SEED, samples: int = SAMPLES
              ) -> tuple[float, float]:
    """The percentile bootstrap interval of `statistic` over the examples of `cols`."""
    n = len(next(iter(cols.values())))
    idx = resamples(n, seed, samples)
    return percentile(statistic({k: v[idx] for k, v in cols.items()}))


def score_intervals(task: str, records: list[dict[str, Any]], seed: int = SEED) -> dict[str, dict[str, Any]]:
    """{score: {low, high, n, method, level}} for every score of `task`, over the examples in `records`."""
    if not records:
        return {}
    cols = columns(task, records)
    n = len(records)
    out = {}
    for key, statistic in STATISTICS[task].items():
        if key in WILSON:
            successes = float(round(statistic(cols) * n / 100.0))
            low, high, method = *wilson(successes, n), "wilson"
        else:
            low, high, method = *bootstrap(statistic, cols, seed), f"bootstrap ({SAMPLES} resamples, seed {seed})"
        out[key] = {"low": low, "high": high, "n": n, "level": LEVEL, "method": method}
    return out


def paired_differences(task: str, records_a: list[dict[str, Any]], records_b: list[dict[str, Any]],
                       seed: int = SEED) -> dict[str, dict[str, Any]]:
    """Score of A minus score of B on the examples both have (matched by id), with the paired bootstrap interval:
    each resample draws the same examples for both. `within_noise`: the interval contains 0."""
    by_id = {r["id"]: r for r in records_b}
    shared = [(r, by_id[r["id"]]) for r in records_a if r["id"] in by_id]
    if not shared:
        raise ValueError("the two evaluations have no example in common (matched by id)")
    a = columns(task, [x for x, _ in shared])
    b = columns(task, [y for _, y in shared])
    idx = resamples(len(shared), seed)
    out = {}
    for key, statistic in STATISTICS[task].items():
        diff = float(statistic(a) - statistic(b))
        low, high = percentile(statistic({k: v[idx] for k, v in a.items()})
                               - statistic({k: v[idx] for k, v in b.items()}))
        out[key] = {"difference": diff, "low": low, "high": high, "n": len(shared), "level": LEVEL,
                    "within_noise": low <= 0.0 <= high, "method": f"paired bootstrap ({SAMPLES} resamples, seed {seed})"}
    return out


def describe(value: float, interval: dict[str, Any] | None) -> str:
    """`58.40 [52.10, 64.00]`, or the value alone when it has no interval."""
    if not interval:
        return f"{value:.2f}"
    return f"{value:.2f} [{interval['low']:.2f}, {interval['high']:.2f}]"
