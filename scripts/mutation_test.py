#!/usr/bin/env python3
"""Mutation-test the core modules with mutmut and write bench/results/mutation.json.

Each module is mutated in its own scratch copy of the repository (outside the working tree, so
mutmut's ``mutants/`` directory never appears in git status), and every mutant runs only the test
files focused on that module, so a module takes minutes instead of the whole suite per mutant.

Install the tool first (it is an optional extra that ``scripts/setup.sh`` does not install):

    .venv/bin/pip install -e '.[mutation]'

Examples:

    .venv/bin/python scripts/mutation_test.py                      # all modules, default budget
    .venv/bin/python scripts/mutation_test.py --modules swarmnode/p2p/scoring.py --budget-s 600

Results from earlier runs of modules not named on the command line are kept in the JSON file.
Not part of CI's default path: it takes tens of minutes on a 2-core machine.

Each module's entry holds mutants, killed, survived, timeout, no_tests, the score, and its surviving
mutants split in two lists: ``explained_survivors`` (each with the ``kind`` and ``reason`` of the
EXPLAINED rule below that covers it: equivalent, text only, or untestable here) and
``unexplained_survivors`` (real gaps). After editing EXPLAINED, re-apply it without running mutmut:

    .venv/bin/python scripts/mutation_test.py --reclassify
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "mutation.json"

# Module -> the test files that exercise it. Smallest modules first: a run that hits its time
# budget still leaves numbers for the cheap ones.
FOCUSED_TESTS: dict[str, list[str]] = {
    "swarmnode/rl/records.py": ["tests/test_sampler.py"],
    "swarmnode/rl/sampler.py": ["tests/test_sampler.py"],
    "swarmnode/wire/caps.py": ["tests/test_wire.py"],
    "swarmnode/p2p/scoring.py": ["tests/test_pipeline.py"],
    "swarmnode/wire/scan.py": ["tests/test_wire.py", "tests/test_wire_properties.py"],
    "swarmnode/wire/envelope.py": ["tests/test_wire.py", "tests/test_wire_properties.py"],
    "swarmnode/sim/report.py": ["tests/test_report.py"],
    "swarmnode/rl/checkpoint.py": ["tests/test_checkpoint.py"],
    "swarmnode/rl/grpo.py": ["tests/test_grpo.py", "tests/test_poisoning_defence.py"],
    "swarmnode/rl/external.py": ["tests/test_external.py", "tests/test_intake.py"],
    "swarmnode/wire/messages.py": ["tests/test_wire.py"],
    "swarmnode/p2p/pipeline.py": ["tests/test_pipeline.py"],
}

# mutmut exit-code status names folded into the four numbers the report keeps.
KILLED_STATUSES = {"killed", "caught by type check"}
SURVIVED_STATUSES = {"survived"}
TIMEOUT_STATUSES = {"timeout"}


Change = str | Callable[[str, str], bool]


@dataclass(frozen=True)
class Explained:
    """A class of surviving mutants judged harmless, with the reason.

    A survivor matches when its function (``Class.method`` or ``function``) fully matches
    ``function`` and ``change`` matches its diff: a regex searched (multi-line) in the changed lines,
    which read ``-original line`` then ``+mutated line``, or a predicate called with the original
    and the mutated lines. ``kind``:

    - ``equivalent``: no observable behaviour differs (taken out of score_without_equivalent);
    - ``text only``: only the wording of a log line or an error/verdict detail differs;
    - ``untestable here``: differs only on hardware or dtypes the CPU test machine does not run
      (CUDA, bfloat16); still counted as a survivor.
    """

    module: str
    function: str
    change: Change
    reason: str
    kind: str = "equivalent"


def _undoes(*pairs: tuple[str, str]) -> Callable[[str, str], bool]:
    """The mutant is the original with exactly one of these (original -> mutated) substitutions."""

    def check(removed: str, added: str) -> bool:
        # mutmut re-indents a call whose last argument it dropped: compare with line breaks removed
        removed, added = (re.sub(r"\s*\n\s*", "", text) for text in (removed, added))
        return any(added.replace(mutated, original) == removed for original, mutated in pairs)

    return check


def _rewrites(pattern: str, replacement: str) -> Callable[[str, str], bool]:
    """The mutant is the original with one regex match replaced (e.g. an argument set to None)."""
    compiled = re.compile(pattern)

    def check(removed: str, added: str) -> bool:
        for match in compiled.finditer(removed):
            if removed[: match.start()] + match.expand(replacement) + removed[match.end() :] == added:
                return True
        return False

    return check


def _drops_arg(pattern: str) -> Callable[[str, str], bool]:
    """The mutant drops one argument matching ``pattern`` (mutmut leaves ``f(a, )``)."""
    middle, last = _rewrites(pattern + ", ", ""), _rewrites(pattern + r"(?=\))", "")
    return lambda removed, added: middle(removed, added) or last(removed, added)


_STRING = re.compile(r'[fbr]?"(?:[^"\\]|\\.)*"')
_MESSAGE_RAISE = re.compile(r"raise (?:ValueError|TypeError|RuntimeError|CheckpointError)\(")


def _message_only(removed: str, added: str) -> bool:
    """Only the text of an exception message changed: the message of a ``raise`` of a message-only
    exception on the line, or a line that is nothing but (part of) a string literal."""

    def norm(text: str) -> str:
        return _STRING.sub('""', text).replace("None", '""')

    if removed == added or norm(removed) != norm(added) or "\n" in removed:
        return False
    return bool(
        _MESSAGE_RAISE.search(removed) or re.fullmatch(r"\s*(?:" + _STRING.pattern + r"\s*)+,?", removed)
    )


_REASON_AND_DETAIL = re.compile(
    r'^(\s*(?:raise (?:WireError|_Failure)\()?(?:"[a-z_]+"|Reason\.\w+|reason), )(.*)$'
)


def _detail_only(removed: str, added: str) -> bool:
    """Only the detail text of a WireError / pipeline failure changed; its reason is the same."""
    old, new = _REASON_AND_DETAIL.match(removed), _REASON_AND_DETAIL.match(added)
    if not old or not new or old.group(1) != new.group(1) or "\n" in removed:
        return False
    return _STRING.sub('""', old.group(2)) == _STRING.sub('""', new.group(2)).replace("None", '""')


_ANY = ".*"
# A log call whose format string or arguments were changed or dropped: both lines are log calls.
_LOG_CALL = r"\A-\s*log\.\w+\(.*\n\+\s*log\.\w+\(.*\Z"
# zip(..., strict=True) -> strict=False / None / dropped
_STRICT = _undoes(("strict=True", "strict=False"), ("strict=True", "strict=None"), (", strict=True)", ", )"))
# a dimension argument -1 -> +1 (the same axis of the 1-D / 2-D tensors it is used on)
_AXIS = _undoes(("(-1)", "(+1)"), ("(-1,", "(+1,"), ("(-1, ", "(+1, "), ("shape[-1]", "shape[+1]"))

_SAMPLER = "swarmnode/rl/sampler.py"
_SCORING = "swarmnode/p2p/scoring.py"
_PIPELINE = "swarmnode/p2p/pipeline.py"
_MESSAGES = "swarmnode/wire/messages.py"
_SCAN = "swarmnode/wire/scan.py"
_ENVELOPE = "swarmnode/wire/envelope.py"
_REPORT = "swarmnode/sim/report.py"
_GRPO = "swarmnode/rl/grpo.py"
_EXTERNAL = "swarmnode/rl/external.py"
_CHECKPOINT = "swarmnode/rl/checkpoint.py"
_TORCH_FNS = r"_generic_chunk|_SelectedTokenLogprobs\..*|token_logprobs|sequence_log_rho|clipped_policy_loss|.*step|.*add_tokens|masked_mean|k3_kl|Batch\..*|build_batch"

EXPLAINED: list[Explained] = [
    Explained(
        _ANY, _ANY, _LOG_CALL, "log line wording/arguments only; logging is not behaviour", "text only"
    ),
    # -- sampler
    Explained(
        _SAMPLER,
        "select_external",
        _undoes(("k <= 0 or", "k < 0 or"), ("k <= 0 or not", "k <= 0 and not")),
        "_weighted_pick returns [] for k <= 0 or no candidates anyway; only skips the strategy lookup",
    ),
    Explained(_SAMPLER, "uniform", r"^\+.*lambda p: 2\.0", "a constant weight of any value is uniform"),
    # -- scoring
    Explained(
        _SCORING,
        "PeerScores.ban_records",
        r"if \(rec\) (or True|and False)|else \"XXXX\"|else 2\)",
        "rec is never None for a peer in the ban table: _evict never forgets a banned peer",
    ),
    Explained(
        _SCORING,
        "PeerScores._lift",
        _undoes(("pop(peer, None)", "pop(peer, )"), ('now, ""', 'now, "XXXX"')),
        "_lift is only called for peers in the ban table; ban_reason is only read while banned and "
        "_ban sets it first",
    ),
    # -- pipeline
    Explained(_ANY, _ANY, _undoes(("last=False", "last=None")), "popitem(last=None) is popitem(last=False)"),
    Explained(
        _PIPELINE,
        "ValidationPipeline.peer_counts",
        _undoes(("get(peer, {})", "get(peer, None)"), ("get(peer, {})", "get(peer, )")),
        "Counter(None) == Counter({}) == Counter()",
    ),
    Explained(
        _PIPELINE,
        "ValidationPipeline._check_replay",
        _undoes(("replay_window - 1)", "replay_window - 2)")),
        "the initial floor is never decisive: any seq <= highest - replay_window - 1 is below the "
        "window check that follows it",
    ),
    Explained(
        _PIPELINE,
        "ValidationPipeline.report",
        _undoes(
            ("get(author, author)", "get(author, None)"),
            ("get(author, author)", "get(author)"),
            ("get(author, author)", "get(author, )"),
        ),
        "an author nobody introduced reported by the node itself: forwarder None or the author are "
        "the same peer set to count and penalize (_record and _blamed skip empty/None and dedupe)",
    ),  # fmt: skip
    Explained(
        _PIPELINE,
        "_Failure.__init__",
        _undoes(("__init__(detail)", "__init__(None)")),
        "the exception text is never read; the verdict uses .detail",
    ),
    Explained(
        _PIPELINE,
        "ValidationPipeline._log_rejection",
        r'^-\s+(?:verdict\.author or "\?"|"rejected message from author)',
        "the arguments / format of the throttled rejection log line",
        "text only",
    ),
    Explained(
        _PIPELINE,
        "ValidationPipeline._log_rejection",
        _undoes(('"-inf"', '"-INF"')),
        'float("-INF") == float("-inf")',
    ),
    Explained(
        _PIPELINE,
        "rule_docs",
        _undoes(('__doc__ or "")', '__doc__ or "XXXX")')),
        'dead fallback: the expression only runs when __doc__ is truthy (else "" is taken)',
    ),
    Explained(
        _PIPELINE,
        "ValidationPipeline.report",
        _undoes(("if msg_id else", "if (msg_id) or True else")),
        "delivered_by.get(None) is None: None is never a key",
    ),
    Explained(
        _PIPELINE,
        "ValidationPipeline.validate",
        _undoes(("None = None", 'None = ""'), ("if candidate else", "if (candidate) or True else")),
        "rules raise only after the candidate is built, and _remember ignores a non-accepted, "
        "non-content verdict, so the initial value and the guard never decide anything",
    ),
    # -- messages: checks the pre-scan (scan.py) already made with its own detail
    Explained(
        _MESSAGES,
        "_check_batch_caps",
        r"groups, cap|completions, cap",
        "unreachable: scan() rejects a batch over the group / completion count caps before this "
        "check runs (tests assert the pre-scan's verdict at cap + 1)",
    ),
    Explained(
        _MESSAGES,
        "decode_heartbeat",
        r"heartbeat has \{n\}|\(\(\"counters\"|reward_trend points\"",
        "unreachable: scan() rejects a heartbeat over the counter / reward_trend count caps first",
    ),
    Explained(
        _MESSAGES,
        "_encode_completions|encode_rollout_batch",
        _STRICT,
        "the lengths were compared just before (ValueError otherwise): strict never triggers",
    ),
    Explained(
        _MESSAGES,
        "_encode_completions",
        _undoes(("tokens < 1 << 32", "tokens <= 1 << 32")),
        "2**32 tokens is refused either way: protobuf's uint32 setter raises ValueError too",
    ),
    # -- scan
    Explained(
        _SCAN,
        "_check_field",
        _undoes(("length // width)", "length / width)")),
        "exact division: the packed length was checked to be a multiple of the width just before",
    ),
    Explained(
        _SCAN,
        "_scan",
        _undoes(("if pos >= len(buf):", "if pos > len(buf):"), ("if pos > len(buf):", "if pos >= len(buf):")),
        "at pos == len(buf) both lead to _Stop (the next varint read stops) or to the end of the loop",
    ),
    Explained(
        _SCAN,
        "_scan",
        _undoes(("length = 0", "length = None"), ("length = 0", "length = 1"), ("body = pos", "body = None")),
        "length and body are only read for length-delimited records, which set them",
    ),
    # -- envelope
    Explained(
        _ENVELOPE,
        "seal",
        _undoes(("compress(payload, ZLIB_LEVEL)", "compress(payload, )")),
        "ZLIB_LEVEL is 6, zlib's default level",
    ),
    Explained(
        _ENVELOPE,
        "seal",
        _undoes(
            ("WireCaps(max_message_bytes=max_message_bytes, ", "WireCaps(max_message_bytes=None, "),
            ("WireCaps(max_message_bytes=max_message_bytes, ", "WireCaps("),
        ),
        "payload_cap reads max_payload_bytes and the schema caps, never max_message_bytes",
    ),  # fmt: skip
    Explained(
        _ENVELOPE,
        "signing_digest",
        _undoes(('">III"', '">iii"')),
        "same bytes for values below 2**31; version, kind and compression are validated small enums",
    ),
    Explained(
        _ENVELOPE,
        "open_payload",
        _undoes(("_INFLATE_CHUNK + 3)", "_INFLATE_CHUNK + 4)")),
        "a backstop loop bound: the loop always ends by eof, the cap or an empty step first",
    ),
    Explained(
        _ENVELOPE,
        "open_payload",
        _undoes(("cap + 1 - len(out)", "cap + 1 + len(out)"), ("cap + 1 - len(out)", "cap + 2 - len(out)")),
        "a bomb is still oversize (len(out) > cap); only how far past the cap inflation may run (memory) "
        "changes, which no test observes",
        "untestable here",
    ),
    # -- grpo
    Explained(_GRPO, _TORCH_FNS, _AXIS, "dim -1 and +1 are the same axis of the 1-D / 2-D tensors here"),
    Explained(
        _GRPO,
        "declared_behaviour_mean|build_batch|.*forward|token_logprobs",
        _STRICT,
        "lengths equal by construction (checked just before, or split with the same chunk size)",
    ),
    Explained(
        _GRPO,
        _ANY,
        _rewrites(r"device=[\w.]+", "device=None"),
        "device=None is the CPU the tests run on; on a GPU this would break (no GPU in the test run)",
        "untestable here",
    ),
    Explained(
        _GRPO,
        _ANY,
        _drops_arg(r"device=[\w.]+"),
        "the default device is the CPU the tests run on; on a GPU this would break",
        "untestable here",
    ),
    Explained(
        _GRPO,
        _ANY,
        lambda removed, added: (
            added == re.sub(r"\.to\((?:dtype|[\w.]+\.dtype)\)", ".to(None)", removed, count=1)
            or _rewrites(r"dtype=(?:dtype|[\w.]+\.dtype)", "dtype=None")(removed, added)
            or _drops_arg(r"dtype=(?:dtype|[\w.]+\.dtype)")(removed, added)
        ),
        "a cast to the model's dtype is a no-op for the float32 models the tests use (bf16 would differ)",
        "untestable here",
    ),
    Explained(
        _GRPO,
        "_chunk_rows|_SelectedTokenLogprobs.forward",
        r"_chunk_rows|^\+\s+end = None|range\(0, n, \)",
        "only the chunk size of the log-prob computation changes; results are chunk-invariant "
        "(test_chunked_logprobs_equal_the_full_vocabulary_oracle runs many chunk sizes)",
    ),
    Explained(
        _GRPO,
        "GRPOTrainer._micro_batches",
        _undoes(("max(1, budget", "max(2, budget")),
        "micro-batching gives the same update whatever the size (test_micro_batches_give_the_same_update)",
    ),
    Explained(
        _GRPO,
        "GRPOTrainer.step",
        _undoes(("set_to_none=True", "set_to_none=False"), ("set_to_none=True", "set_to_none=None")),
        "zeroed gradients and absent ones give the same next gradient",
    ),
    Explained(
        _GRPO,
        "group_weights",
        _undoes(("max_source_loss_share: float = 1.0", "max_source_loss_share: float = 2.0")),
        "a sender's weight never exceeds its kind's share (<= 1), so a default cap of 1 or 2 never binds",
    ),
    Explained(
        _GRPO,
        _ANY,
        _rewrites(r"\.to\((?:self\.)?device\)", ".to(None)"),
        "a move to the CPU the tests run on; on a GPU this would break",
        "untestable here",
    ),
    Explained(
        _GRPO,
        "GRPOTrainer.step",
        _undoes(
            ("            weights.external_share,", "            None,"),
            ("            weights.capped_sources,", "            None,"),
        ),
        "the subset's share and capped list are never read (build_batch uses policy/kl; metrics use the full weights)",
    ),
    Explained(
        _GRPO,
        "GRPOTrainer.step",
        _undoes(
            ("keep |= full.kl_weight > 0", "keep = full.kl_weight > 0"), ("kl_weight > 0", "kl_weight >= 0")
        ),
        "with beta > 0 every group has a positive KL weight: every row is kept either way",
    ),
    Explained(
        _GRPO,
        "GRPOTrainer.step",
        _undoes(
            ("old_logp = None if single_step else", "old_logp = None if (single_step) and False else"),
            ("single_step = cfg.num_iterations * minibatches == 1", "single_step = None"),
        ),
        "the frozen pass gives the same old log-probs as the detached new ones before the only update; "
        "only a forward pass is saved",
    ),  # fmt: skip
    Explained(
        _GRPO,
        "GRPOTrainer._micro_batches",
        r"cuda|mem_get_info",
        "the CUDA memory budget branch; the test machine has no GPU",
        "untestable here",
    ),
    Explained(
        _GRPO,
        _ANY,
        _message_only,
        "exception message wording (the exception type and when it is raised are tested)",
        "text only",
    ),
    # -- report
    Explained(
        _REPORT,
        "plot",
        _undoes(('"Agg"', '"agg"'), ('"Agg"', '"AGG"')),
        "matplotlib backend names are case-insensitive",
    ),
    Explained(
        _REPORT,
        "_pm",
        _undoes(("digits: int = 2", "digits: int = 3")),
        "every caller passes digits",
    ),
    Explained(
        _REPORT,
        "build_report",
        _undoes(('newline="")', "newline=None)"), ('"w", newline="")', '"w", )')),
        "no newline translation on POSIX: the csv module's \\r\\n is written as is either way",
    ),
    Explained(
        _REPORT,
        "node_record",
        _undoes(
            ('or r.get("grad_norm") or 0)', 'or r.get("grad_norm") or 1)'),
            ('_local", 0) or 0', '_local", None) or 0'),
            ('_local", 0) or 0', '_local", ) or 0'),
            ('_external", 0) or 0', '_external", None) or 0'),
            ('_external", 0) or 0', '_external", ) or 0'),
        ),
        "a missing value counts as 0 either way (None or 0 is 0; 1 is not above the spike threshold)",
    ),  # fmt: skip
    Explained(
        _REPORT,
        "summarize",
        _undoes(
            ('how="mean")', "how=None)"), ('how="mean")', 'how="XXmeanXX")'), ('how="mean")', 'how="MEAN")')
        ),
        'per_seed takes the mean for anything but how="sum"',
    ),
    # -- external
    Explained(
        _EXTERNAL,
        "ExternalIntake._score",
        _undoes(
            ("foreign=True", "foreign=False"), ("foreign=True", "foreign=None"), (", foreign=True)", ", )")
        ),
        "foreign=True only refuses datasets unsafe on foreign text, and process() refuses those before scoring",
    ),
    Explained(
        _EXTERNAL,
        "ExternalIntake.process",
        _STRICT,
        "completions and finished flags have equal lengths by construction (the wire decoder builds both "
        "from the same records)",
    ),
    Explained(
        _EXTERNAL,
        "group_fingerprint",
        _undoes((r'b"\x00"', r'b"XX\x00XX"')),
        "any fixed separator gives the same de-duplication (the fingerprint is only compared with itself)",
    ),
    Explained(
        _EXTERNAL,
        "ExternalPool._note_round",
        _undoes(("source, -1)", "source, -2)")),
        "rounds are non-negative (uint64 on the wire): max(-1 or -2, round) is the round",
    ),
    Explained(
        _EXTERNAL,
        "ExternalPool._remember|ExternalPool.offer",
        _undoes(("key] = None", 'key] = ""')),
        "an OrderedDict used as an ordered set: the values are never read",
    ),
    Explained(
        _EXTERNAL,
        "ExternalPool.offer",
        _undoes(
            ("max_candidate_bytes // 4", "max_candidate_bytes / 4"),
            ("max_candidates // 4)", "max_candidates / 4)"),
        ),
        "compared with integer sizes / counts: > n // 4 and > n / 4 decide alike",
    ),
    Explained(
        _EXTERNAL,
        "ExternalPool.verify_for_use",
        _undoes(("wanted <= 0", "wanted < 0"), ('_drop_candidate(key, "")', "_drop_candidate(key, None)")),
        "wanted == 0 stops at the first check of the loop anyway; an empty or None reason is not counted",
    ),
    # -- checkpoint
    Explained(
        _CHECKPOINT,
        "_sha256",
        r"f\.read\(",
        "the digest does not depend on the read size (None reads the file at once)",
    ),
    Explained(
        _CHECKPOINT,
        "save_checkpoint",
        _undoes(
            ("ignore_errors=True)", "ignore_errors=None)"),
            ("ignore_errors=True)", "ignore_errors=False)"),
            (", ignore_errors=True)", ", )"),
        ),
        "removing a directory this process just created or a crash left: no error to ignore in any test",
    ),  # fmt: skip
    Explained(
        _CHECKPOINT,
        "Checkpoint.restore",
        _undoes(
            ("strict=False)", "strict=None)"),
            ("weights_only=True)", "weights_only=None)"),
            (", weights_only=True)", ", )"),
        ),
        "strict=None is falsy like False; torch >= 2.6 defaults to weights_only=True",
    ),  # fmt: skip
    Explained(
        _CHECKPOINT,
        "capture_rng_state|restore_rng_state",
        r"cuda",
        "the CUDA random streams: the test machine has no GPU",
        "untestable here",
    ),
    Explained(
        _CHECKPOINT,
        "_fsync_tree",
        _ANY,
        "which files and directories are fsynced, and in which order, shows only after a power loss",
        "untestable here",
    ),
    Explained(
        _CHECKPOINT,
        "verify_checkpoint|Checkpoint.restore",
        r'\A(?:[-+]\s*(?:\+ )?\(?f?"[^\n]*\n?)+\Z',
        "CheckpointError message wording (the error and when it is raised are tested)",
        "text only",
    ),
    Explained(
        _CHECKPOINT,
        "restore_rng_state",
        _undoes(
            ("np.array(np_keys, dtype=np.uint32)", "np.array(np_keys, dtype=None)"),
            ("np.array(np_keys, dtype=np.uint32)", "np.array(np_keys, )"),
        ),
        "numpy casts int64 keys to uint32 in set_state: the same stream continues (checked by hand)",
    ),  # fmt: skip
    Explained(
        _CHECKPOINT,
        "verify_checkpoint",
        r'\A(?:-\s*f?"[^\n]*\n)+\+\s*None\Z',
        "CheckpointError message wording (a multi-line message replaced by None)",
        "text only",
    ),
    Explained(_CHECKPOINT, _ANY, _message_only, "CheckpointError / ValueError message wording", "text only"),
    Explained(_SAMPLER, _ANY, _message_only, "exception message wording", "text only"),
    Explained(
        _ANY, _ANY, _detail_only, "the detail text of a rejection; its reason is unchanged", "text only"
    ),
]


def _function_of(mutant_name: str) -> str:
    """``pkg.mod.xǁClassǁmethod__mutmut_3`` -> ``Class.method``; ``pkg.mod.x_func__mutmut_3`` -> ``func``."""
    key = re.sub(r"__mutmut_\d+$", "", mutant_name.rpartition(".")[2])
    if key.startswith("x\u01c1"):
        return ".".join(part for part in key[1:].split("\u01c1") if part)
    return key.removeprefix("x_")


def _changed_lines(diff: str) -> str:
    """The ``-``/``+`` lines of a unified diff, without the file headers."""
    lines = diff.splitlines()
    return "\n".join(line for line in lines if line[:1] in "-+" and not line.startswith(("---", "+++")))


def explain(module: str, mutant_name: str, change: str) -> Explained | None:
    """The first rule in EXPLAINED that covers this survivor, or None."""
    function = _function_of(mutant_name)
    for rule in EXPLAINED:
        if rule.module not in (_ANY, module):
            continue
        if not re.fullmatch(rule.function, function):
            continue
        if callable(rule.change):
            lines = change.splitlines()
            removed = "\n".join(line[1:] for line in lines if line.startswith("-"))
            added = "\n".join(line[1:] for line in lines if line.startswith("+"))
            if rule.change(removed, added):
                return rule
        elif re.search(rule.change, change, re.MULTILINE):
            return rule
    return None


def classify(module: str, result: dict[str, Any]) -> dict[str, Any]:
    """Split a module's survivors into explained (with reason) and unexplained, and add scores."""
    survivors = result.pop("surviving_mutants", None)
    if survivors is None:
        survivors = result.get("explained_survivors", []) + result.get("unexplained_survivors", [])
    explained: list[dict[str, str]] = []
    unexplained: list[dict[str, str]] = []
    for s in survivors:
        entry = {k: v for k, v in s.items() if k not in ("reason", "kind")}
        rule = explain(module, s["mutant"], s["change"])
        if rule is None:
            unexplained.append(entry)
        else:
            explained.append({**entry, "kind": rule.kind, "reason": rule.reason})
    result["explained_survivors"] = explained
    result["unexplained_survivors"] = unexplained
    result["explained"] = len(explained)
    result["unexplained"] = len(unexplained)
    detected = result.get("killed", 0) + result.get("timeout", 0)
    checked = detected + result.get("survived", 0) + result.get("no_tests", 0)
    equivalent = sum(1 for e in explained if e["kind"] == "equivalent")
    result["score"] = round(detected / checked, 4) if checked else None
    if result.get("mutants") == 0:
        result["note"] = (
            "mutmut generated no mutants: it skips decorated functions (@property), and this module's "
            "only logic is in properties (covered by unit tests all the same)"
        )
    result["score_without_equivalent"] = (
        round(detected / (checked - equivalent), 4) if checked - equivalent > 0 else None
    )
    return result


def _require_mutmut() -> None:
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit(
            "mutmut is not installed in this interpreter. Install the optional extra with\n"
            f"  {sys.executable} -m pip install -e '.[mutation]'\nand run this script again."
        )


def _mutmut_config(module: str, tests: list[str]) -> str:
    """The [tool.mutmut] table that restricts mutation to one module and its focused tests."""
    quoted_tests = ", ".join(json.dumps(t) for t in [*tests, "-p", "no:cacheprovider"])
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["swarmnode"]\n'
        f"only_mutate = [{json.dumps(module)}]\n"
        f"pytest_add_cli_args_test_selection = [{quoted_tests}]\n"
        # Several test files are not pure unit tests; a generous multiplier keeps a slow shared
        # machine from calling ordinary mutants timeouts.
        "timeout_multiplier = 20.0\n"
        "use_git_change_detection = false\n"
    )


def _prepare_scratch(module: str, tests: list[str], scratch: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(REPO_ROOT / "swarmnode", scratch / "swarmnode", ignore=ignore)
    shutil.copytree(REPO_ROOT / "tests", scratch / "tests", ignore=ignore)
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (scratch / "pyproject.toml").write_text(pyproject + _mutmut_config(module, tests), encoding="utf-8")


def _diff_for(mutant_name: str, module: str, scratch: Path, env: dict[str, str]) -> str:
    """mutmut's diff of one mutant: in this process (mutmut reads ``mutants/`` relative to the
    working directory), or through ``mutmut show`` if mutmut's internals moved."""
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            return get_diff_for_mutant(mutant_name, path=module)
        finally:
            os.chdir(cwd)
    except Exception:  # noqa: BLE001 -- any failure falls back to the CLI
        proc = subprocess.run(
            [sys.executable, "-m", "mutmut", "show", mutant_name],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.stdout.strip() or proc.stderr.strip()[-500:]


def _survivor(
    mutant_name: str, module: str, scratch: Path, env: dict[str, str], status: str
) -> dict[str, str]:
    diff = _diff_for(mutant_name, module, scratch, env)
    return {"mutant": mutant_name, "status": status, "change": _changed_lines(diff) or diff[-500:]}


def _collect(module: str, scratch: Path, env: dict[str, str]) -> dict[str, Any]:
    from mutmut.stats import status_by_exit_code

    meta_path = scratch / "mutants" / (module + ".meta")
    if not meta_path.exists():
        return {"status": "no results (mutmut produced no .meta file; see output_tail)"}
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    exit_codes: dict[str, int | None] = meta.get("exit_code_by_key", {})
    counts = {"killed": 0, "survived": 0, "timeout": 0, "no_tests": 0, "not_checked": 0, "other": 0}
    survivors: list[dict[str, str]] = []
    for name, code in sorted(exit_codes.items()):
        status = status_by_exit_code[code]
        if status in KILLED_STATUSES:
            counts["killed"] += 1
        elif status in SURVIVED_STATUSES:
            counts["survived"] += 1
            survivors.append(_survivor(name, module, scratch, env, "survived"))
        elif status in TIMEOUT_STATUSES:
            counts["timeout"] += 1
        elif status == "no tests":
            counts["no_tests"] += 1
            survivors.append(_survivor(name, module, scratch, env, "no tests"))
        elif status == "not checked":
            counts["not_checked"] += 1
        else:
            counts["other"] += 1
    # Timeouts count as detected (mutmut's own convention); untested mutants count as survivors.
    # classify() adds the scores.
    return {
        "status": "complete" if counts["not_checked"] == 0 else "partial (time budget)",
        "mutants": len(exit_codes),
        **counts,
        "surviving_mutants": survivors,
    }


def run_module(module: str, tests: list[str], budget_s: float, max_children: int) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="swarmnode-mutation-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)]
    started = time.monotonic()
    output_tail = ""
    timed_out = False
    proc: subprocess.Popen[str] | None = None
    try:
        _prepare_scratch(module, tests, scratch)
        proc = subprocess.Popen(  # noqa: SIM115 -- killed in the finally below on any exit
            command,
            cwd=scratch,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Own process group, so the budget stops mutmut's forked mutant workers too.
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=budget_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
        output_tail = (out or "")[-1500:]
        result = _collect(module, scratch, env)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
    result.update(
        {
            "tests": tests,
            "command": " ".join(["mutmut", "run", "--max-children", str(max_children)])
            + f"  (only_mutate={module}, tests={' '.join(tests)}; via scripts/mutation_test.py)",
            "wall_s": round(time.monotonic() - started, 1),
            "hit_time_budget": timed_out,
        }
    )
    if result.get("status", "").startswith("no results"):
        if timed_out:
            result["status"] = "not run (time): budget spent before mutmut recorded any mutant"
        result["output_tail"] = output_tail
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modules", nargs="*", default=list(FOCUSED_TESTS), help="modules to mutate")
    parser.add_argument("--budget-s", type=float, default=900.0, help="time budget per module, seconds")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--total-budget-s", type=float, default=None, help="start no module after this many seconds"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--reclassify",
        action="store_true",
        help="run nothing: apply EXPLAINED to the survivors already in the output file",
    )
    args = parser.parse_args(argv)
    if args.reclassify:
        return _reclassify(args.output)
    _require_mutmut()
    # SIGTERM unwinds like Ctrl-C, so the scratch copy and mutmut's workers are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_started = time.monotonic()

    unknown = [m for m in args.modules if m not in FOCUSED_TESTS]
    if unknown:
        parser.error(f"no focused tests known for {unknown}; add them to FOCUSED_TESTS in {__file__}")

    report: dict[str, Any] = {}
    if args.output.exists():
        report = json.loads(args.output.read_text(encoding="utf-8"))
    modules: dict[str, Any] = report.get("modules", {})
    for module in FOCUSED_TESTS:
        modules.setdefault(module, {"status": "not run (time)", "tests": FOCUSED_TESTS[module]})

    from importlib.metadata import version

    for module in args.modules:
        if args.total_budget_s is not None and time.monotonic() - run_started > args.total_budget_s:
            print(f"[mutation] {module}: not run (total time budget spent)", flush=True)
            continue
        print(f"[mutation] {module} (tests: {' '.join(FOCUSED_TESTS[module])})", flush=True)
        modules[module] = classify(
            module, run_module(module, FOCUSED_TESTS[module], args.budget_s, args.max_children)
        )
        modules[module]["finished_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        keys = ("mutants", "killed", "survived", "timeout", "no_tests", "explained", "unexplained", "score")
        summary = {k: modules[module].get(k) for k in keys}
        print(f"[mutation] {module}: {summary}", flush=True)
        _write(args.output, f"mutmut {version('mutmut')}", modules)
    return 0


def _write(output: Path, tool: str, modules: dict[str, Any]) -> None:
    report = {
        "tool": tool,
        "script": "scripts/mutation_test.py",
        "score_definition": "(killed + timeout) / (killed + survived + timeout + no_tests)",
        "score_without_equivalent_definition": (
            "the same with the survivors judged equivalent taken out of the denominator; "
            "'text only' survivors (log/message wording) stay counted as survivors"
        ),
        "modules": modules,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _reclassify(output: Path) -> int:
    report = json.loads(output.read_text(encoding="utf-8"))
    modules: dict[str, Any] = report.get("modules", {})
    for module, result in modules.items():
        if "surviving_mutants" in result or "explained_survivors" in result:
            for s in result.get("surviving_mutants", []):
                if "change" not in s:  # results written before survivors kept their changed lines
                    s["change"] = _changed_lines(s.pop("diff", ""))
                    s.setdefault("status", s.pop("why", "survived"))
            classify(module, result)
    _write(output, report.get("tool", "mutmut"), modules)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
