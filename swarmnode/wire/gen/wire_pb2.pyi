from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    KIND_ROLLOUT_BATCH: _ClassVar[Kind]
    KIND_HEARTBEAT: _ClassVar[Kind]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZLIB: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]
KIND_UNSPECIFIED: Kind
KIND_ROLLOUT_BATCH: Kind
KIND_HEARTBEAT: Kind
COMPRESSION_NONE: Compression
COMPRESSION_ZLIB: Compression
COMPRESSION_ZSTD: Compression

class TaskRef(_message.Message):
    __slots__ = ("dataset", "config_digest", "seed", "index", "generator_version")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    config_digest: str
    seed: int
    index: int
    generator_version: str
    def __init__(self, dataset: _Optional[str] = ..., config_digest: _Optional[str] = ..., seed: _Optional[int] = ..., index: _Optional[int] = ..., generator_version: _Optional[str] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("text", "finished", "behaviour_logprob", "num_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    finished: bool
    behaviour_logprob: float
    num_tokens: int
    def __init__(self, text: _Optional[str] = ..., finished: _Optional[bool] = ..., behaviour_logprob: _Optional[float] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class RolloutGroup(_message.Message):
    __slots__ = ("task", "question", "completions", "model_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    task: TaskRef
    question: str
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    model_id: str
    def __init__(self, task: _Optional[_Union[TaskRef, _Mapping]] = ..., question: _Optional[str] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class RolloutBatch(_message.Message):
    __slots__ = ("node_round", "created_at_ms", "sequence", "model_id", "groups")
    NODE_ROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    node_round: int
    created_at_ms: int
    sequence: int
    model_id: str
    groups: _containers.RepeatedCompositeFieldContainer[RolloutGroup]
    def __init__(self, node_round: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., sequence: _Optional[int] = ..., model_id: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[RolloutGroup, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("name", "model_id", "node_round", "reward_trend", "counters", "created_at_ms", "sequence", "silo", "peers", "software_version", "admin_address", "metrics_address")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ROUND_FIELD_NUMBER: _ClassVar[int]
    REWARD_TREND_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    node_round: int
    reward_trend: _containers.RepeatedScalarFieldContainer[float]
    counters: _containers.ScalarMap[str, int]
    created_at_ms: int
    sequence: int
    silo: bool
    peers: int
    software_version: str
    admin_address: str
    metrics_address: str
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ..., node_round: _Optional[int] = ..., reward_trend: _Optional[_Iterable[float]] = ..., counters: _Optional[_Mapping[str, int]] = ..., created_at_ms: _Optional[int] = ..., sequence: _Optional[int] = ..., silo: _Optional[bool] = ..., peers: _Optional[int] = ..., software_version: _Optional[str] = ..., admin_address: _Optional[str] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("version", "kind", "compression", "payload", "signer_public_key", "signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: Kind
    compression: Compression
    payload: bytes
    signer_public_key: bytes
    signature: bytes
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., payload: _Optional[bytes] = ..., signer_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...
