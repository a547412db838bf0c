"""Task registry over reasoning-gym: sample tasks, regenerate them from a `TaskRef`, score completions.

How an item is addressed. reasoning-gym builds item ``i`` of a dataset with seed ``s`` from
``Random(s + i)`` (most datasets) or from a generator seeded with ``s`` (a few precompute their
items in ``__init__``). A `TaskRef` therefore carries (dataset, config digest, seed, index,
generator version); the receiver rebuilds the dataset with that seed and the config the digest
names, and reads item ``index``. Dataset instances and items are cached, so regenerating one item
costs one ``__getitem__`` call, not ``index + 1`` of them.

Seed spaces. Training seeds are drawn below `EVAL_SEED_BASE - size`; held-out item ``k`` of a
dataset lives at seed + index == ``EVAL_SEED_BASE + k``. Both the ``s + i`` streams and the seeds
themselves are disjoint. Small task spaces (e.g. 2-term sums) still repeat question *texts*, so
`sample` also skips any question whose text is one of the first ``eval_size`` held-out questions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import random
from dataclasses import dataclass
from typing import Any

import reasoning_gym
from reasoning_gym.dataset import ProceduralDataset

from swarmnode.tasks.presets import TaskSpec, resolve_preset
from swarmnode.tasks.reference import TaskRef
from swarmnode.tasks.safety import ForeignTextPolicy, foreign_text_policy, refused_datasets
from swarmnode.tasks.verify import DEFAULT_MAX_COMPLETION_CHARS, score_completion

EVAL_SEED_BASE = 2**31  # numpy-seeded datasets need seed + index < 2**32
MAX_DRAWS_PER_TASK = 1000  # bound on rejection sampling against held-out question texts


class UnknownTaskError(LookupError):
    """A task reference this node cannot regenerate (dataset, config, version or index it does not serve)."""


class RefusedForForeignTextError(LookupError):
    """The dataset's scorer is not safe on a peer's text (swarmnode.tasks.safety); never scored."""


@dataclass(frozen=True)
class Task:
    ref: TaskRef
    question: str
    answer: str
    metadata: dict[str, Any]

    def entry(self) -> dict[str, Any]:
        """The item as reasoning-gym's scorers expect it (several score against the metadata)."""
        return {"question": self.question, "answer": self.answer, "metadata": self.metadata}


def generator_version() -> str:
    """The installed reasoning-gym distribution version (its ``__version__`` is stale)."""
    return importlib.metadata.version("reasoning-gym")


def full_config(spec: TaskSpec) -> dict[str, Any]:
    """The spec's complete dataset config (defaults filled in), without the seed, as plain JSON data."""
    try:
        _, config_cls = reasoning_gym.factory.DATASETS[spec.dataset]
    except KeyError:
        raise UnknownTaskError(f"reasoning-gym has no dataset {spec.dataset!r}") from None
    try:
        config = dataclasses.asdict(config_cls(**spec.config))
    except TypeError as exc:
        raise ValueError(f"bad config for reasoning-gym dataset {spec.dataset!r}: {exc}") from None
    config.pop("seed", None)
    return json.loads(json.dumps(config, default=list))  # tuples -> lists, as they travel in JSON


def config_digest(config: dict[str, Any]) -> str:
    """Short sha256 of the canonical JSON of a dataset config."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Served:
    spec: TaskSpec
    config: dict[str, Any]  # complete config, seed excluded
    digest: str
    size: int  # items per seed; indices are in [0, size)


class TaskRegistry:
    """The tasks this node serves: a preset's datasets at a fixed reasoning-gym version."""

    # Completions longer than this score 0 unread (runtime sets it from grpo.max_completion_length).
    max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS

    def __init__(
        self,
        preset: str,
        partial_credit: bool = False,
        eval_size: int = 200,
        specs: tuple[TaskSpec, ...] | None = None,
        verify_extra: tuple[TaskSpec, ...] = (),
    ) -> None:
        """`specs` (an inline mix) replaces the preset's specs; `verify_extra` are served (regenerated,
        scored, evaluated on) but never sampled: peers' specialties this node can check."""
        self.preset = preset
        self.partial_credit = partial_credit
        self.eval_size = eval_size
        self.version = generator_version()
        sampled_specs = specs or resolve_preset(preset)
        self.served: list[_Served] = []
        self._sampled: list[_Served] = []
        self._by_key: dict[tuple[str, str], _Served] = {}
        for position, spec in enumerate((*sampled_specs, *verify_extra)):
            config = full_config(spec)
            served = _Served(spec, config, config_digest(config), int(config.get("size", 500)))
            if position < len(sampled_specs):
                self._sampled.append(served)
            if (spec.dataset, served.digest) not in self._by_key:  # a verified spec that is also sampled
                self._by_key[(spec.dataset, served.digest)] = served
                self.served.append(served)
        self._weights = [s.spec.weight for s in self._sampled]
        self._dataset = functools.lru_cache(maxsize=64)(self._make_dataset)
        self._item = functools.lru_cache(maxsize=4096)(self._make_item)
        self._held_out_questions: frozenset[str] | None = None

    @classmethod
    def from_config(cls, tasks: Any) -> TaskRegistry:
        """The registry a node's `tasks` config section describes (preset or inline mix, plus verify_extra)."""

        def specs(entries: Any) -> tuple[TaskSpec, ...]:
            return tuple(TaskSpec(e.dataset, dict(e.config), e.weight) for e in entries)

        return cls(
            tasks.preset,
            tasks.partial_credit,
            tasks.eval_size,
            specs(tasks.mix) or None,
            specs(tasks.verify_extra),
        )

    # -- addressing -------------------------------------------------------------------------

    def _make_dataset(self, dataset: str, digest: str, seed: int) -> ProceduralDataset:
        served = self._by_key[(dataset, digest)]
        config = dict(served.config, seed=seed)
        with contextlib.redirect_stdout(io.StringIO()):  # some generators (bf) print progress dots
            return reasoning_gym.create_dataset(served.spec.dataset, **config)

    def _make_item(self, ref: TaskRef) -> Task:
        with contextlib.redirect_stdout(io.StringIO()):
            item = self._dataset(ref.dataset, ref.config_digest, ref.seed)[ref.index]
        # A JSON round trip gives the metadata the shape it has after travelling (tuples -> lists).
        metadata = json.loads(json.dumps(item["metadata"], default=str))
        return Task(ref, item["question"], str(item["answer"]), metadata)

    def _ref(self, served: _Served, seed: int, index: int) -> TaskRef:
        return TaskRef(served.spec.dataset, served.digest, seed, index, self.version)

    def _served_for(self, ref: TaskRef) -> _Served:
        served_names = sorted({s.spec.dataset for s in self.served})
        if ref.generator_version != self.version:
            raise UnknownTaskError(
                f"task {ref.key()} was made by reasoning-gym {ref.generator_version}, this node runs "
                f"{self.version}: install reasoning-gym=={ref.generator_version} to serve it"
            )
        if ref.dataset not in served_names:
            raise UnknownTaskError(
                f"task {ref.key()}: dataset {ref.dataset!r} is not in this node's preset {self.preset!r} "
                f"(serves {served_names})"
            )
        served = self._by_key.get((ref.dataset, ref.config_digest))
        if served is None:
            digests = [s.digest for s in self.served if s.spec.dataset == ref.dataset]
            raise UnknownTaskError(
                f"task {ref.key()}: config digest {ref.config_digest!r} of {ref.dataset!r} is not served "
                f"here (this node's configs: {digests})"
            )
        if not 0 <= ref.index < served.size or not 0 <= ref.seed < 2**32 - served.size:
            raise UnknownTaskError(
                f"task {ref.key()}: seed must be in [0, 2**32 - {served.size}) and index in [0, {served.size})"
            )
        return served

    # -- public API -------------------------------------------------------------------------

    def regenerate(self, ref: TaskRef) -> Task:
        """Rebuild question, answer and metadata from a reference; raises UnknownTaskError."""
        self._served_for(ref)
        return self._item(ref)

    def sample(self, rng: random.Random, n: int) -> list[Task]:
        """`n` training tasks drawn from the training seed space (never a held-out question text)."""
        held_out = self._held_out()
        tasks: list[Task] = []
        for _ in range(n):
            for _draw in range(MAX_DRAWS_PER_TASK):
                served = rng.choices(self._sampled, weights=self._weights)[0]
                seed = rng.randrange(EVAL_SEED_BASE - served.size)
                task = self._item(self._ref(served, seed, rng.randrange(served.size)))
                if task.question not in held_out:
                    break
            else:
                raise RuntimeError(
                    f"preset {self.preset!r}: {MAX_DRAWS_PER_TASK} draws in a row hit held-out questions; "
                    f"its question space is too small for eval_size={self.eval_size}: lower eval_size"
                )
            tasks.append(task)
        return tasks

    def eval_tasks(self, n: int) -> list[Task]:
        """The first `n` held-out tasks: deterministic, round-robin over the preset's datasets."""
        tasks = []
        for k in range(n):
            served = self.served[k % len(self.served)]
            position = k // len(self.served)  # item k of this dataset's held-out stream
            seed = EVAL_SEED_BASE + (position // served.size) * served.size
            tasks.append(self._item(self._ref(served, seed, position % served.size)))
        return tasks

    def is_held_out(self, task: Task) -> bool:
        """True when the question text is one of the first `eval_size` held-out questions."""
        return task.question in self._held_out()

    def score(self, task: Task, completion: str, foreign: bool = False) -> float:
        """This node's reward for `completion` (0 on a missing answer, an answer outside the dataset's
        grammar, an over-long completion, or any scorer error).

        `foreign=True` marks a peer's text: datasets refused for it raise RefusedForForeignTextError
        and nothing is scored. Our own text of a refused dataset goes to reasoning-gym's scorer.
        """
        self._served_for(task.ref)
        policy = self.foreign_text_policy(task.ref.dataset)
        if foreign and policy.refused:
            raise RefusedForForeignTextError(
                f"dataset {task.ref.dataset!r} is refused for peers' text ({policy.note})"
            )
        scorer = self._dataset(task.ref.dataset, task.ref.config_digest, task.ref.seed).score_answer
        return score_completion(
            scorer,
            task.entry(),
            completion,
            self.partial_credit,
            policy=policy,
            max_chars=self.max_completion_chars,
        )

    def check_served(self, ref: TaskRef) -> None:
        """Raise UnknownTaskError unless this node serves `ref` (cheap: no item is generated)."""
        self._served_for(ref)

    def foreign_text_policy(self, dataset: str) -> ForeignTextPolicy:
        return foreign_text_policy(dataset)

    def refused_for_foreign_text(self) -> list[str]:
        """The served datasets whose groups from peers are refused (their scorer is not safe)."""
        return refused_datasets([s.spec.dataset for s in self.served])

    def rebuild_args(self) -> dict[str, Any]:
        """JSON data from which `from_rebuild_args` builds an equal registry (in the scoring worker)."""

        def plain(spec: TaskSpec) -> dict[str, Any]:
            return {"dataset": spec.dataset, "config": spec.config, "weight": spec.weight}

        sampled = [s.spec for s in self._sampled]
        return {
            "preset": self.preset,
            "partial_credit": self.partial_credit,
            "eval_size": self.eval_size,
            "max_completion_chars": self.max_completion_chars,
            "specs": [plain(spec) for spec in sampled],
            "verify_extra": [plain(s.spec) for s in self.served if s.spec not in sampled],
        }

    @classmethod
    def from_rebuild_args(cls, args: dict[str, Any]) -> TaskRegistry:
        def specs(entries: list[dict[str, Any]]) -> tuple[TaskSpec, ...]:
            return tuple(TaskSpec(e["dataset"], dict(e["config"]), float(e["weight"])) for e in entries)

        registry = cls(
            args["preset"],
            args["partial_credit"],
            args["eval_size"],
            specs(args["specs"]),
            specs(args["verify_extra"]),
        )
        registry.max_completion_chars = int(args["max_completion_chars"])
        return registry

    def _held_out(self) -> frozenset[str]:
        if self._held_out_questions is None:
            self._held_out_questions = frozenset(t.question for t in self.eval_tasks(self.eval_size))
        return self._held_out_questions
