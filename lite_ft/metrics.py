"""Task metrics, all in percent (0-100).

QA uses the official SQuAD v1.1 answer normalization (lower case, no punctuation, no articles a/an/the, single
spaces) and takes the best score over the reference answers. Classification reports accuracy and macro F1.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

# The scores each task reports, in the order tables show them.
SCORE_KEYS = {"qa": ("exact_match", "f1"), "classification": ("accuracy", "macro_f1"),
              "instruction": ("loss", "perplexity")}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lower, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent, each the max over an example's references, averaged over examples."""
    if len(predictions) != len(references):
        raise ValueError("one list of references per prediction")
    n = len(predictions)
    em = sum(max(exact_match(p, r) for r in refs) for p, refs in zip(predictions, references))
    f1 = sum(max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references))
    return {"exact_match": 100.0 * em / max(n, 1), "f1": 100.0 * f1 / max(n, 1), "n": n}


def classification_scores(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro F1 (unweighted mean of per-class F1 over the classes present in labels or
    predictions, as scikit-learn computes it) in percent."""
    if len(predictions) != len(labels):
        raise ValueError("one label per prediction")
    n = len(labels)
    correct = sum(int(p == y) for p, y in zip(predictions, labels))
    classes = sorted(set(labels) | set(predictions))
    f1s = []
    for c in classes:
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    macro = sum(f1s) / len(f1s) if f1s else 0.0
    return {"accuracy": 100.0 * correct / max(n, 1), "macro_f1": 100.0 * macro, "n": n,
            "num_labels": num_labels}
