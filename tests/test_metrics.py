"""Task metrics against independent implementations: SQuAD v1.1 EM/F1 (torchmetrics), accuracy and macro F1
(scikit-learn)."""
from __future__ import annotations

import random
from typing import Iterator

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from torchmetrics.text import SQuAD

from lite_ft.metrics import classification_scores, exact_match, normalize_answer, qa_scores, token_f1

# (prediction, references): punctuation, articles, case, whitespace, partial overlap, repeated tokens, empty
# predictions, several references where only one matches, unicode.
QA_CASES: list[tuple[str, list[str]]] = [
    ("tiny gas molecules", ["tiny gas molecules"]),
    ("Tiny gas molecules.", ["tiny gas molecules"]),
    ("the tiny gas molecules", ["tiny gas molecules"]),
    ("gas molecules", ["tiny gas molecules"]),
    ("tiny gas molecules and dust", ["tiny gas molecules"]),
    ("", ["in 1874", "1874"]),
    ("1874", ["in 1874", "1874"]),
    ("In 1874!", ["1874"]),
    ("a baker", ["a baker named Odile Fenwick", "Odile Fenwick"]),
    ("Odile", ["a baker named Odile Fenwick", "Odile Fenwick"]),
    ("Sallow river", ["the Sallow River", "Sallow River"]),
    ("an apple a day", ["apple day"]),
    ("The   Sallow\tRiver", ["Sallow River"]),
    ("river river river", ["the river"]),
    ("red, red wine", ["red wine", "wine"]),
    ("orange and red", ["dominated by orange and red", "orange"]),
    ("blue", ["red"]),
    ("forty times as much air", ["roughly forty times as much air"]),
    ("roughly forty", ["forty times"]),
    ("Theatre", ["the atre"]),                      # "the" inside a word is not an article
    ("U.S.A.", ["USA"]),
    ("U.S.A.", ["U S A"]),
    ("don't stop", ["dont stop"]),
    ("café au lait", ["Café au lait"]),
    ("42", ["forty-two", "42"]),
    ("x", ["y", "z", "x y"]),
    ("the the the", ["cat"]),
    ("a b c d e f", ["c d e f g h"]),
    ("New York City", ["New York", "York City", "City"]),
    ("$5 million", ["5 million dollars"]),
    ("mid-1990s", ["mid1990s", "1990s"]),
    ("An", ["a"]),                                  # only articles on both sides
    ("...", ["!"]),                                 # only punctuation on both sides
    ("first; second", ["second"]),
    ("  leading and trailing  ", ["leading and trailing"]),
    ("one two three four five six seven", ["three four", "one", "seven six five"]),
]
# torchmetrics follows the SQuAD v2 script for an empty normalized side (F1 = 1 when both are empty); lite-ft follows
# the v1.1 script (F1 = 0 without a common token). They agree whenever no reference normalizes to nothing, so the
# cross-check keeps such references out; test_v1_1_f1_when_reference_is_only_articles pins lite-ft's behaviour.
QA_CASES = [(p, refs) for p, refs in QA_CASES if all(normalize_answer(r) for r in refs)]

WORDS = ["the", "a", "an", "river", "River", "blue", "sky,", "light.", "1874", "in", "Odile", "baker", "of", "gas",
         "molecules", "red", "and", "(red)", "forty", "times", "air!", "café"]


@pytest.fixture
def float64() -> Iterator[None]:
    """torchmetrics builds its scores with torch.tensor(...): compute in float64 so 1e-6 is a fair tolerance."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def torchmetrics_squad(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    metric = SQuAD()
    metric.set_dtype(torch.float64)
    preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
    target = [{"answers": {"answer_start": [0] * len(refs), "text": refs}, "id": str(i)}
              for i, refs in enumerate(references)]
    metric.update(preds, target)
    return {k: float(v) for k, v in metric.compute().items()}


def random_cases(seed: int, n: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)

    def phrase(min_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, 5)))

    cases = [(phrase(0), [phrase(1) for _ in range(rng.randint(1, 3))]) for _ in range(n)]
    return [(p, refs) for p, refs in cases if all(normalize_answer(r) for r in refs)]


def test_cases_cover_what_they_claim() -> None:
    assert len(QA_CASES) >= 30
    em = [max(exact_match(p, r) for r in refs) for p, refs in QA_CASES]
    f1 = [max(token_f1(p, r) for r in refs) for p, refs in QA_CASES]
    assert 0 < sum(em) < len(em)                       # some exact, some not
    assert any(0 < x < 1 for x in f1)                  # partial overlaps
    assert any(p == "" for p, _ in QA_CASES)


@pytest.mark.parametrize("case", range(len(QA_CASES)), ids=[repr(c[0])[:30] for c in QA_CASES])
def test_qa_scores_match_torchmetrics_per_example(case: int, float64: None) -> None:
    prediction, references = QA_CASES[case]
    ours = qa_scores([prediction], [references])
    theirs = torchmetrics_squad([prediction], [references])
    assert ours["exact_match"] == pytest.approx(theirs["exact_match"], abs=1e-6)
    assert ours["f1"] == pytest.approx(theirs["f1"], abs=1e-6)
    assert ours["n"] == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qa_scores_match_torchmetrics_over_a_set(seed: int, float64: None) -> None:
    cases = QA_CASES + random_cases(seed, 60)
    random.Random(seed).shuffle(cases)
    predictions, references = [c[0] for c in cases], [c[1] for c in cases]
    ours = qa_scores(predictions, references)
    theirs = torchmetrics_squad(predictions, references)
    assert ours["exact_match"] == pytest.approx(theirs["exact_match"], abs=1e-6)
    assert ours["f1"] == pytest.approx(theirs["f1"], abs=1e-6)
    assert ours["n"] == len(cases)
    assert 0 < ours["f1"] < 100 and 0 < ours["exact_match"] < 100


def test_qa_score_bounds_and_ordering() -> None:
    assert qa_scores(["Sallow River"], [["the Sallow River"]]) == {"exact_match": 100.0, "f1": 100.0, "n": 1}
    assert qa_scores(["nothing alike"], [["Sallow River"]]) == {"exact_match": 0.0, "f1": 0.0, "n": 1}
    partial = qa_scores(["Sallow"], [["Sallow River"]])
    assert partial["exact_match"] == 0.0 and partial["f1"] == pytest.approx(100 * 2 / 3)
    # The best reference counts, whatever its position.
    assert qa_scores(["1874"], [["in the year 1874", "1874"]])["exact_match"] == 100.0


def test_v1_1_f1_when_reference_is_only_articles() -> None:
    assert exact_match("", "The") == 1.0               # both normalize to ""
    assert token_f1("", "The") == 0.0                  # v1.1: no common token, no credit


def test_qa_scores_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        qa_scores(["a", "b"], [["a"]])


def test_qa_scores_of_nothing() -> None:
    assert qa_scores([], []) == {"exact_match": 0.0, "f1": 0.0, "n": 0}


@pytest.mark.parametrize("seed, n, k", [(0, 50, 2), (1, 200, 4), (2, 7, 3), (3, 120, 5)])
def test_classification_scores_match_sklearn(seed: int, n: int, k: int) -> None:
    rng = random.Random(seed)
    labels = [rng.randrange(k) for _ in range(n)]
    labels[0], labels[1] = 0, k - 1
    predictions = [y if rng.random() < 0.6 else rng.randrange(k) for y in labels]
    predictions = [0 if p == k - 1 else p for p in predictions]        # class k-1 is never predicted
    assert k - 1 in labels and k - 1 not in predictions
    ours = classification_scores(predictions, labels, k)
    assert ours["accuracy"] == pytest.approx(100 * accuracy_score(labels, predictions), abs=1e-9)
    macro = f1_score(labels, predictions, average="macro", zero_division=0)
    assert ours["macro_f1"] == pytest.approx(100 * macro, abs=1e-9)
    assert (ours["n"], ours["num_labels"]) == (n, k)


def test_classification_predicted_class_absent_from_labels_counts_in_macro_f1() -> None:
    labels, predictions = [0, 0, 1, 1], [0, 2, 1, 1]                    # class 2 only ever predicted
    ours = classification_scores(predictions, labels, 3)
    assert ours["macro_f1"] == pytest.approx(100 * f1_score(labels, predictions, average="macro", zero_division=0))
    assert ours["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    assert ours["accuracy"] == 75.0


def test_classification_perfect_and_rejects_mismatch() -> None:
    assert classification_scores([1, 0, 1], [1, 0, 1], 2)["macro_f1"] == 100.0
    with pytest.raises(ValueError):
        classification_scores([1], [1, 0], 2)
