"""The node's own verifier: reasoning-gym's scorer applied to the last <answer>...</answer> span.

Reward rules (see docs ML_NOTES, "scoring traps"):
- only the last ``<answer>`` span counts; no span -> 0;
- binary by default (1 only when reasoning-gym scores exactly 1.0), because the default scorer
  gives partial credit for substrings (gold "214" vs "2140" scores 0.75);
- any exception raised by a scorer, or a non-finite score, counts as 0: a completion can never
  crash the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from reasoning_gym.utils import extract_answer

Scorer = Callable[[str | None, dict[str, Any]], float]


def score_completion(scorer: Scorer, entry: dict[str, Any], completion: str, partial_credit: bool = False) -> float:
    """Reward in [0, 1] of `completion` for the reasoning-gym `entry` ({question, answer, metadata})."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    try:
        score = float(scorer(answer, entry))
    except Exception:  # a scorer bug on odd input is the completion's fault, not the node's
        return 0.0
    if not math.isfinite(score):
        return 0.0
    if partial_credit:
        return min(max(score, 0.0), 1.0)
    return 1.0 if score == 1.0 else 0.0
