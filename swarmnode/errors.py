"""The exceptions a user can cause (bad config, missing model, key in use, corrupt checkpoint...).

The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from swarmnode.config import ConfigError
    from swarmnode.identity import IdentityError
    from swarmnode.policy.loading import ModelLoadError
    from swarmnode.rl.checkpoint import CheckpointError
    from swarmnode.tasks.presets import UnknownPresetError
    from swarmnode.tasks.registry import UnknownTaskError

    return (ConfigError, IdentityError, ModelLoadError, CheckpointError, UnknownTaskError, UnknownPresetError)
