"""The task reference: the address from which a receiver regenerates a question and its answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class TaskRef:
    dataset: str  # reasoning-gym dataset name, e.g. "chain_sum"
    config_digest: str  # hex digest of the dataset's canonical config (see tasks.registry)
    seed: int  # dataset seed
    index: int  # item index within the dataset
    generator_version: str  # installed reasoning-gym distribution version, e.g. "0.1.25"

    def key(self) -> str:
        return f"{self.dataset}/{self.config_digest}/{self.seed}/{self.index}@{self.generator_version}"
