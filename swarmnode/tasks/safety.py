"""Which reasoning-gym scorers may see a peer's text, and the answer grammar each one needs first.

Peer completions are hostile text. Several reasoning-gym 0.1.25 scorers hand the answer to code
that executes it (``eval`` in binary_matrix, spiral_matrix, string_insertion, n_queens; sympy's
``parse_expr``, which evaluates Python, in puzzle24, countdown, simple/intermediate_integration,
polynomial_multiplication) or do work exponential in it (propositional_logic builds a truth table
over every distinct atom string of the answer). This module is the audit result (also written out
in docs/SCORING_SAFETY.md): for every dataset, a `ForeignTextPolicy`:

- ``exact``: the dataset uses reasoning-gym's default scorer (``answer == gold``, else substring
  credit ``gold in answer``): linear in the answer; the grammar only bounds its length and bans
  control characters.
- ``grammar``: a custom scorer, audited; a strict answer grammar (bounded length, linear-time
  regular expression without nested quantifiers, or a hand parser) runs before it, and where the
  scorer itself is unsafe on grammar-valid text it is replaced by an equivalent safe one.
- ``refused``: a custom scorer that executes the answer, or that nobody audited yet. Groups of
  these datasets are refused for external intake (`IntakeReason.DATASET_REFUSED`); the node still
  trains on its own completions of them.

An answer outside its dataset's grammar scores 0 (also with partial credit), exactly like a wrong
answer: the grammar never rejects a group, it only keeps text away from the scorer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

AnswerCheck = Callable[[str, dict[str, Any]], bool]
Scorer = Callable[[str | None, dict[str, Any]], float]

# Longest answer any grammar accepts, whatever the gold's length.
HARD_MAX_ANSWER_CHARS = 4096


class PolicyKind(StrEnum):
    EXACT = "exact"  # reasoning-gym's default scorer: string equality / substring
    GRAMMAR = "grammar"  # audited custom scorer behind a strict answer grammar
    REFUSED = "refused"  # never scored on foreign text


@dataclass(frozen=True)
class ForeignTextPolicy:
    dataset: str
    kind: PolicyKind
    note: str  # what the audit found
    check: AnswerCheck | None = None  # grammar; None for refused datasets
    scorer: Scorer | None = None  # replacement for reasoning-gym's scorer, when that one is unsafe

    @property
    def has_grammar(self) -> bool:
        return self.check is not None

    @property
    def refused(self) -> bool:
        return self.kind is PolicyKind.REFUSED

    def accepts(self, answer: str, entry: dict[str, Any]) -> bool:
        """True when `answer` is in this dataset's grammar (False for refused datasets)."""
        if self.check is None or len(answer) > HARD_MAX_ANSWER_CHARS:
            return False
        return self.check(answer, entry)


# -- grammars -----------------------------------------------------------------------------------
# Every pattern is used with fullmatch on an answer whose length was bounded first, and has no
# nested or adjacent overlapping quantifiers, so Python's backtracking engine runs in linear time.

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _gold_bound(entry: dict[str, Any], floor: int = 64) -> int:
    """Answers longer than 4x the gold (+ a floor) cannot score 1, and earn at most 0.25 of
    substring credit from the default scorer: refusing them loses nothing that matters."""
    return min(HARD_MAX_ANSWER_CHARS, 4 * len(str(entry.get("answer", ""))) + floor)


def _exact_check(answer: str, entry: dict[str, Any]) -> bool:
    return len(answer) <= _gold_bound(entry) and _CONTROL.search(answer) is None


def _pattern_check(pattern: str, max_chars: int) -> AnswerCheck:
    compiled = re.compile(pattern)

    def check(answer: str, entry: dict[str, Any]) -> bool:
        return len(answer) <= max_chars and compiled.fullmatch(answer) is not None

    return check


# Decimal numbers as `decimal.Decimal` reads them, with short exponents (a huge exponent makes
# Decimal arithmetic allocate) and an optional thousands separator for chain_sum's scorer.
_NUMBER = r"[+-]?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,2})?"
_NUMBER_WITH_COMMAS = r"[+-]?(?:[0-9][0-9,]{0,52}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,2})?"
_FRACTION = (
    r"\$?(?:[0-9]{1,32} ?/ ?[0-9]{1,32}"
    r"|\\d?frac ?\{ ?[0-9]{1,32} ?\} ?\{ ?[0-9]{1,32} ?\})\$?"
)
_CALENDAR = r"[A-Za-z]{1,16}|[+-]?[0-9]{1,12}"
_MATRIX_CHARS = re.compile(r"[0-9 \n]+")

_LOGIC_BINARY = frozenset("∧∨→↔")
_LOGIC_MAX_CHARS = 128  # parse_expr is quadratic in the length; example conclusions are ~10 chars
_LOGIC_MAX_DEPTH = 16


def _logic_check(answer: str, entry: dict[str, Any]) -> bool:
    """A well-formed formula: operand (binary-op operand)*, operand = '¬'* (VAR | '(' formula ')').

    For such text reasoning-gym's `parse_expr` only ever produces single-letter atoms, so its
    truth table has at most 2**len(variables) rows, with variables from the local task (the scorer
    already refuses letters outside them). Without this, every distinct atom string ("PP", "P1",
    "(P)(Q)") adds a variable and doubles the table: 30 of them is 2**30 assignments.
    """
    if len(answer) > _LOGIC_MAX_CHARS:
        return False
    depth = 0
    expect_operand = True
    for char in answer:
        if char == " ":
            continue
        if expect_operand:
            if char == "¬":
                continue
            if "A" <= char <= "Z":
                expect_operand = False
            elif char == "(":
                depth += 1
                if depth > _LOGIC_MAX_DEPTH:
                    return False
            else:
                return False
        elif char in _LOGIC_BINARY:
            expect_operand = True
        elif char == ")":
            depth -= 1
            if depth < 0:
                return False
        else:
            return False
    return depth == 0 and not expect_operand


def _matrix_check(answer: str, entry: dict[str, Any]) -> bool:
    return len(answer) <= _gold_bound(entry, floor=16) and _MATRIX_CHARS.fullmatch(answer) is not None


def _matrix_scorer(answer: str | None, entry: dict[str, Any]) -> float:
    """binary_matrix without its ``eval``: on digit/space/newline text, reasoning-gym's fallback
    (``eval`` of a Python list of lists) can only raise or yield an int, i.e. score 0, so exact
    equality gives the same score."""
    return 1.0 if answer == entry["answer"] else 0.0


# -- the audit table -----------------------------------------------------------------------------

# Datasets whose class keeps reasoning-gym's default `score_answer` (checked against the installed
# version by tests/test_safe_scoring.py).
DEFAULT_SCORER_DATASETS = (
    "acre", "aiw", "arc_1d", "base_conversion", "basic_arithmetic", "bf", "binary_alternation",
    "caesar_cipher", "count_bits", "count_primes", "course_schedule", "gcd", "isomorphic_strings",
    "largest_island", "lcm", "leg_counting", "letter_counting", "list_functions", "mahjong_puzzle",
    "maze", "modulo_grid", "number_filtering", "number_sequence", "ransom_note", "rotate_matrix",
    "rotten_oranges", "simple_equations", "simple_geometry", "string_manipulation", "string_splitting",
    "string_synthesis", "syllogism", "word_sequence_reversal",
)  # fmt: skip

_AUDITED: tuple[ForeignTextPolicy, ...] = (
    ForeignTextPolicy(
        "chain_sum", PolicyKind.GRAMMAR,
        "Decimal() of the answer after removing commas; grammar: a plain decimal number, short exponent",
        _pattern_check(_NUMBER_WITH_COMMAS, 64),
    ),
    ForeignTextPolicy(
        "decimal_arithmetic", PolicyKind.GRAMMAR,
        "Decimal() of the answer and a subtraction; grammar: a plain decimal number, short exponent",
        _pattern_check(_NUMBER, 96),
    ),
    ForeignTextPolicy(
        "calendar_arithmetic", PolicyKind.GRAMMAR,
        "string compare (weekday, yes/no) or int() of the answer; grammar: one word or a short integer",
        _pattern_check(_CALENDAR, 16),
    ),
    ForeignTextPolicy(
        "fraction_simplification", PolicyKind.GRAMMAR,
        "anchored regex and int(); grammar: a/b or \\frac{a}{b} with short integers, optional $...$",
        _pattern_check(_FRACTION, 96),
    ),
    ForeignTextPolicy(
        "propositional_logic", PolicyKind.GRAMMAR,
        "quadratic parse_expr, truth table over every distinct atom (exponential); grammar: a "
        "well-formed formula of single-letter atoms, <= 128 chars, nesting <= 16",
        _logic_check,
    ),
    ForeignTextPolicy(
        "binary_matrix", PolicyKind.GRAMMAR,
        "eval() of the answer (remote code execution); grammar: digits, spaces, newlines; scorer "
        "replaced by exact equality (same scores on grammar-valid text)",
        _matrix_check, _matrix_scorer,
    ),
)  # fmt: skip

_EXECUTES_ANSWER = {
    "spiral_matrix": "eval() of the answer",
    "string_insertion": "eval() of the answer",
    "n_queens": "eval() of the answer",
    "puzzle24": "sympy parse_expr (Python eval) of the answer",
    "countdown": "sympy parse_expr (Python eval) of the answer",
    "simple_integration": "sympy parse_expr (Python eval) of the answer",
    "intermediate_integration": "sympy parse_expr (Python eval) of the answer",
    "polynomial_multiplication": "sympy parse_expr (Python eval) of the answer",
}


def _build_table() -> dict[str, ForeignTextPolicy]:
    table = {
        name: ForeignTextPolicy(name, PolicyKind.EXACT, "default scorer: == and substring", _exact_check)
        for name in DEFAULT_SCORER_DATASETS
    }
    table.update({p.dataset: p for p in _AUDITED})
    table.update(
        {name: ForeignTextPolicy(name, PolicyKind.REFUSED, why) for name, why in _EXECUTES_ANSWER.items()}
    )
    return table


FOREIGN_TEXT_POLICY: dict[str, ForeignTextPolicy] = _build_table()


def foreign_text_policy(dataset: str) -> ForeignTextPolicy:
    """The policy for `dataset`; datasets nobody audited are refused (default deny)."""
    policy = FOREIGN_TEXT_POLICY.get(dataset)
    if policy is None:
        return ForeignTextPolicy(dataset, PolicyKind.REFUSED, "custom scorer not audited yet")
    return policy


def refused_datasets(datasets: list[str] | tuple[str, ...]) -> list[str]:
    """The names among `datasets` whose groups are refused for external intake."""
    return sorted({d for d in datasets if foreign_text_policy(d).refused})
