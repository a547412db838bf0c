"""The node's own verifier: reasoning-gym's scorer applied to the last <answer>...</answer> span.

Reward rules (see docs ML_NOTES, "scoring traps"):
- only the last ``<answer>`` span counts; no span -> 0;
- binary by default (1 only when reasoning-gym scores exactly 1.0), because the default scorer
  gives partial credit for substrings (gold "214" vs "2140" scores 0.75);
- any exception raised by a scorer, or a non-finite score, counts as 0: a completion can never
  crash the node.

Bounded work (docs/SCORING_SAFETY.md): a completion longer than ``max_chars`` scores 0 without
being read, and the answer span is found in linear time. reasoning-gym's own `extract_answer`
(``<answer>\\s?(.*?)\\s?</answer>`` with `re.finditer`) is quadratic on text with many opening tags
and no closing one: 64 completions of ``"<answer> " * 910`` cost 15-20 s of CPU. When a dataset has
an answer grammar (`swarmnode.tasks.safety`), an answer outside it scores 0 before any scorer runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarmnode.tasks.safety import AnswerPolicy

Scorer = Callable[[str | None, dict[str, Any]], float]

OPEN_TAG = "<answer>"
CLOSE_TAG = "</answer>"
# Completions longer than this are never read (the registry passes a bound derived from the config).
DEFAULT_MAX_COMPLETION_CHARS = 16_384
CHARS_PER_TOKEN_BOUND = 32  # generous: real tokenizers average 3-5 characters per token
MIN_COMPLETION_CHARS = 1024


def completion_char_budget(max_completion_length: int) -> int:
    """Characters of a completion worth reading for a node that generates at most
    `max_completion_length` tokens: longer text (a peer's, or ours) scores 0 unread."""
    return max(MIN_COMPLETION_CHARS, CHARS_PER_TOKEN_BOUND * max_completion_length)


def extract_last_answer(completion: str) -> str | None:
    """The stripped text of the last ``<answer>...</answer>`` span, or None; linear time.

    Same result as reasoning-gym's ``extract_answer(completion)`` (non-overlapping spans left to
    right, each from an opening tag to the first closing tag after it, the last one wins, stripped),
    but every `str.find` starts after the previous span, so the whole text is scanned about once.
    """
    last: tuple[int, int] | None = None
    position = 0
    while True:
        start = completion.find(OPEN_TAG, position)
        if start < 0:
            break
        end = completion.find(CLOSE_TAG, start + len(OPEN_TAG))
        if end < 0:
            break  # no closing tag after this opening one: no later opening tag can close either
        last = (start + len(OPEN_TAG), end)
        position = end + len(CLOSE_TAG)
    if last is None:
        return None
    return completion[last[0] : last[1]].strip()


def score_completion(
    scorer: Scorer,
    entry: dict[str, Any],
    completion: str,
    partial_credit: bool = False,
    *,
    policy: AnswerPolicy | None = None,
    max_chars: int = DEFAULT_MAX_COMPLETION_CHARS,
) -> float:
    """Reward in [0, 1] of `completion` for the reasoning-gym `entry` ({question, answer, metadata}).

    With a `policy` that has a grammar, the answer must match it before any scorer sees it, and the
    policy's replacement scorer (if any) is used instead of `scorer`.
    """
    if len(completion) > max_chars:
        return 0.0
    answer = extract_last_answer(completion)
    if answer is None:
        return 0.0
    if policy is not None and policy.has_grammar:
        if not policy.accepts(answer, entry):
            return 0.0
        scorer = policy.scorer or scorer
    try:
        score = float(scorer(answer, entry))
    except Exception:  # a scorer bug on odd input is the completion's fault, not the node's
        return 0.0
    if not math.isfinite(score):
        return 0.0
    if partial_credit:
        return min(max(score, 0.0), 1.0)
    return 1.0 if score == 1.0 else 0.0
