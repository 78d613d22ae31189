"""How an answer is scored: its first line against the task's accepted targets, as
ROUGE-L F1 and SQuAD-style exact match, 0 to 100, the best over the targets."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer


def first_line(text: str) -> str:
    """The first non-empty line, stripped: BIG-bench answers are one line, and a model that
    keeps talking after it must not be penalised (or rewarded) for the rest."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, targets: Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised target, else 0."""
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalized == normalize_answer(t) for t in targets) else 0.0


@lru_cache(maxsize=1)
def _rouge_scorer() -> RougeScorer:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, targets: Sequence[str]) -> float:
    """ROUGE-L F1 (0 to 100), the best over the accepted targets."""
    scorer = _rouge_scorer()
    best = max((scorer.score(t, prediction)["rougeL"].fmeasure for t in targets), default=0.0)
    return 100.0 * best
