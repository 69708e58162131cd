"""Score intervals: nominal coverage on a binomial with known p, per-example columns that reproduce the task's own
scores, seeded results, and paired differences that say when two models differ beyond noise."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from lite_ft.data.tasks.causal import loss_scores
from lite_ft.intervals import (
    STATISTICS,
    bootstrap,
    columns,
    paired_differences,
    score_intervals,
    wilson,
)
from lite_ft.metrics import classification_scores, qa_scores


@pytest.mark.parametrize("p,n", [(0.3, 60), (0.75, 200)])
def test_intervals_cover_a_known_binomial_p_95_percent_of_the_time(p: float, n: int) -> None:
    rng = np.random.default_rng(2024)
    reps = 600  # coverage's own standard error: about 0.9 points
    wilson_hits = bootstrap_hits = 0
    for seed in range(reps):
        scores = 100.0 * (rng.random(n) < p)
        low, high = wilson(scores.sum() / 100.0, n)
        wilson_hits += low <= 100 * p <= high
        low, high = bootstrap(STATISTICS["qa"]["f1"], {"f1": scores}, seed=seed, samples=1000)
        bootstrap_hits += low <= 100 * p <= high
    assert 0.925 <= wilson_hits / reps <= 0.975
    assert 0.92 <= bootstrap_hits / reps <= 0.975  # the percentile bootstrap runs a little short at small n


def test_wilson_coverage_computed_exactly_from_the_binomial_is_close_to_95_percent() -> None:
    """No simulation noise: the probability that the interval holds p, summed over every outcome k of n draws.
    Binomial intervals' coverage oscillates with p and n; Wilson's stays near nominal on average."""
    for n in (20, 60, 200):
        coverages = []
        for p in np.linspace(0.05, 0.95, 37):
            hits = [low <= 100 * p <= high for low, high in (wilson(k, n) for k in range(n + 1))]
            coverages.append(sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1) if hits[k]))
        assert 0.94 <= float(np.mean(coverages)) <= 0.96, (n, np.mean(coverages))
        assert min(coverages) > 0.90, (n, min(coverages))


def qa_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["red", "blue", "the river", "Paris", "1912", "a cat"]
    return [{"id": str(i), "prediction": rng.choice(words), "references": rng.sample(words, 2)} for i in range(n)]


def test_columns_reproduce_the_tasks_own_scores() -> None:
    records = qa_records(50, 0)
    cols = columns("qa", records)
    own = qa_scores([r["prediction"] for r in records], [r["references"] for r in records])
    assert STATISTICS["qa"]["exact_match"](cols) == pytest.approx(own["exact_match"])
    assert STATISTICS["qa"]["f1"](cols) == pytest.approx(own["f1"])
    rng = random.Random(1)
    labels = [rng.randrange(3) for _ in range(80)]
    preds = [y if rng.random() < 0.6 else rng.randrange(4) for y in labels]  # class 3 only ever predicted
    records = [{"id": str(i), "prediction": p, "label": y} for i, (p, y) in enumerate(zip(preds, labels))]
    cols = columns("classification", records)
    own = classification_scores(preds, labels, 4)
    assert STATISTICS["classification"]["accuracy"](cols) == pytest.approx(own["accuracy"])
    assert STATISTICS["classification"]["macro_f1"](cols) == pytest.approx(own["macro_f1"])
    loss = [{"id": str(i), "loss_sum": 2.0 * i, "response_tokens": i + 1} for i in range(5)]
    own_loss = loss_scores([r["loss_sum"] for r in loss], [r["response_tokens"] for r in loss])["loss"]
    assert STATISTICS["instruction"]["loss"](columns("instruction", loss)) == pytest.approx(own_loss)


def test_intervals_hold_the_score_have_n_and_are_seeded() -> None:
    records = qa_records(40, 3)
    first, again = score_intervals("qa", records), score_intervals("qa", records)
    assert first == again
    own = qa_scores([r["prediction"] for r in records], [r["references"] for r in records])
    for key in ("exact_match", "f1"):
        assert first[key]["n"] == 40 and first[key]["level"] == 0.95
        assert first[key]["low"] <= own[key] <= first[key]["high"]
        assert first[key]["high"] - first[key]["low"] > 5  # 40 examples cannot pin a score down to a few points
    assert first["exact_match"]["method"] == "wilson" and first["f1"]["method"].startswith("bootstrap")
    assert score_intervals("qa", records, seed=1)["f1"] != first["f1"]


def test_paired_difference_is_noise_between_equals_and_real_between_a_right_and_a_wrong_model() -> None:
    records = qa_records(100, 5)
    same = paired_differences("qa", records, list(reversed(records)))  # matched by id, not by position
    assert same["f1"]["difference"] == 0 and same["f1"]["low"] == same["f1"]["high"] == 0
    assert same["f1"]["within_noise"]
    right = [dict(r, prediction=r["references"][0]) for r in records]
    diff = paired_differences("qa", right, records)
    assert diff["exact_match"]["difference"] > 0 and not diff["exact_match"]["within_noise"]
    assert diff["exact_match"]["low"] > 0 and diff["f1"]["n"] == 100
    # Two models that differ on a handful of 100 examples: the interval of the difference holds 0.
    close = [dict(r, prediction=r["references"][0]) if i < 2 else r for i, r in enumerate(records)]
    assert paired_differences("qa", close, records)["f1"]["within_noise"]
    with pytest.raises(ValueError, match="no example in common"):
        paired_differences("qa", records[:5], [dict(r, id="x" + r["id"]) for r in records[:5]])
