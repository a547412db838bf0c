"""Conversions between the admin records (swarmnode.admin.source) and their protobuf messages.

One generic pair of functions serves every record: the proto messages use the same field names
as the dataclasses, so a field added to both sides needs no code here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from google.protobuf.message import Message

from swarmnode.admin.source import Event, NetworkNode, NodeStatus, PeerInfo

Record = TypeVar("Record", NodeStatus, PeerInfo, NetworkNode, Event)


def to_proto(record: Any, message_type: type[Message], **extra: Any) -> Message:
    """A dataclass record as the protobuf message with the same field names."""
    values = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    return message_type(**values, **extra)


def from_proto(message: Message, record_type: type[Record]) -> Record:
    """A protobuf message as the dataclass record with the same field names."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(record_type):
        value = getattr(message, f.name)
        if hasattr(value, "items"):  # protobuf map
            value = dict(value.items())
        elif hasattr(value, "extend") and not isinstance(value, str | bytes):  # repeated field
            value = list(value)
        values[f.name] = value
    return record_type(**values)
