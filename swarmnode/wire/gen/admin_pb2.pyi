from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "peer_id", "model_id", "round", "rounds_target", "recent_rewards", "uptime_s", "silo", "p2p_state", "listen_addrs", "data_dir", "started_at", "config_digest", "version", "connected_peers", "admin_address", "metrics_address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TARGET_FIELD_NUMBER: _ClassVar[int]
    RECENT_REWARDS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    P2P_STATE_FIELD_NUMBER: _ClassVar[int]
    LISTEN_ADDRS_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_PEERS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    peer_id: str
    model_id: str
    round: int
    rounds_target: int
    recent_rewards: _containers.RepeatedScalarFieldContainer[float]
    uptime_s: float
    silo: bool
    p2p_state: str
    listen_addrs: _containers.RepeatedScalarFieldContainer[str]
    data_dir: str
    started_at: float
    config_digest: str
    version: str
    connected_peers: int
    admin_address: str
    metrics_address: str
    def __init__(self, name: _Optional[str] = ..., peer_id: _Optional[str] = ..., model_id: _Optional[str] = ..., round: _Optional[int] = ..., rounds_target: _Optional[int] = ..., recent_rewards: _Optional[_Iterable[float]] = ..., uptime_s: _Optional[float] = ..., silo: _Optional[bool] = ..., p2p_state: _Optional[str] = ..., listen_addrs: _Optional[_Iterable[str]] = ..., data_dir: _Optional[str] = ..., started_at: _Optional[float] = ..., config_digest: _Optional[str] = ..., version: _Optional[str] = ..., connected_peers: _Optional[int] = ..., admin_address: _Optional[str] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class PeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("peer_id", "addrs", "connected_since", "msgs_in", "msgs_out", "bytes_in", "bytes_out", "verdicts", "score", "banned", "ban_reason", "banned_until")
    class VerdictsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_FIELD_NUMBER: _ClassVar[int]
    MSGS_IN_FIELD_NUMBER: _ClassVar[int]
    MSGS_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BANNED_FIELD_NUMBER: _ClassVar[int]
    BAN_REASON_FIELD_NUMBER: _ClassVar[int]
    BANNED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    addrs: _containers.RepeatedScalarFieldContainer[str]
    connected_since: float
    msgs_in: int
    msgs_out: int
    bytes_in: int
    bytes_out: int
    verdicts: _containers.ScalarMap[str, int]
    score: float
    banned: bool
    ban_reason: str
    banned_until: float
    def __init__(self, peer_id: _Optional[str] = ..., addrs: _Optional[_Iterable[str]] = ..., connected_since: _Optional[float] = ..., msgs_in: _Optional[int] = ..., msgs_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., verdicts: _Optional[_Mapping[str, int]] = ..., score: _Optional[float] = ..., banned: _Optional[bool] = ..., ban_reason: _Optional[str] = ..., banned_until: _Optional[float] = ...) -> None: ...

class PeersReply(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    def __init__(self, peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ...) -> None: ...

class NetworkRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NetworkNode(_message.Message):
    __slots__ = ("peer_id", "name", "model_id", "round", "reward_trend", "last_seen", "counters", "silo", "peers", "version", "admin_address", "metrics_address")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REWARD_TREND_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    name: str
    model_id: str
    round: int
    reward_trend: _containers.RepeatedScalarFieldContainer[float]
    last_seen: float
    counters: _containers.ScalarMap[str, int]
    silo: bool
    peers: int
    version: str
    admin_address: str
    metrics_address: str
    def __init__(self, peer_id: _Optional[str] = ..., name: _Optional[str] = ..., model_id: _Optional[str] = ..., round: _Optional[int] = ..., reward_trend: _Optional[_Iterable[float]] = ..., last_seen: _Optional[float] = ..., counters: _Optional[_Mapping[str, int]] = ..., silo: _Optional[bool] = ..., peers: _Optional[int] = ..., version: _Optional[str] = ..., admin_address: _Optional[str] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class NetworkReply(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NetworkNode]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NetworkNode, _Mapping]]] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("cursor", "max_duration_s")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    max_duration_s: float
    def __init__(self, cursor: _Optional[int] = ..., max_duration_s: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "kind", "message", "fields", "cursor")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    time: float
    kind: str
    message: str
    fields: _containers.ScalarMap[str, str]
    cursor: int
    def __init__(self, time: _Optional[float] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., fields: _Optional[_Mapping[str, str]] = ..., cursor: _Optional[int] = ...) -> None: ...
