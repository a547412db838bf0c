"""The IPC frame format between the node and its libp2p host process."""

from __future__ import annotations

import struct

import pytest

from swarmnode.p2p.ipc import (
    MAX_FRAME_BYTES,
    BannedPeer,
    Deliver,
    FrameDecoder,
    IPCError,
    P2PStatus,
    Publish,
    Report,
    Shutdown,
    Snapshot,
    encode_frame,
)

FRAMES = [
    Publish(kind="ROLLOUT_BATCH", data=b"\x00\xffenvelope", queued_at=1.5),
    Deliver(
        kind="HEARTBEAT",
        data=bytes(range(256)),
        origin="12D3KooWabc",
        msg_id="ab" * 32,
        received_at=2.0,
        forwarder="12D3KooWrelay",
    ),
    Report(peer_id="12D3KooWabc", reason="question_mismatch", msg_id="cd" * 32),
    Snapshot(status={"peer_id": "12D3KooWabc", "silo": False, "verdicts": {"accepted": 3}}),
    Shutdown(),
]


def test_every_frame_type_round_trips_with_binary_data_untouched() -> None:
    stream = b"".join(encode_frame(f) for f in FRAMES)
    assert list(FrameDecoder().feed(stream)) == FRAMES


def test_decoder_reassembles_frames_split_at_every_byte() -> None:
    stream = b"".join(encode_frame(f) for f in FRAMES)
    decoder = FrameDecoder()
    out = [frame for i in range(len(stream)) for frame in decoder.feed(stream[i : i + 1])]
    assert out == FRAMES


def test_oversize_frame_is_refused_on_both_sides() -> None:
    with pytest.raises(IPCError, match="exceeds the IPC limit"):
        encode_frame(Publish(kind="ROLLOUT_BATCH", data=b"x" * MAX_FRAME_BYTES, queued_at=0.0))
    with pytest.raises(IPCError, match="out of range"):
        list(FrameDecoder().feed(struct.pack(">II", MAX_FRAME_BYTES + 1, 2)))
    with pytest.raises(IPCError, match="exceeds frame length"):
        list(FrameDecoder().feed(struct.pack(">II", 10, 7) + b"x" * 6))


def test_malformed_header_raises_ipc_error_naming_the_header() -> None:
    header = b'{"type":"nonsense"}'
    with pytest.raises(IPCError, match="malformed IPC frame header"):
        list(FrameDecoder().feed(struct.pack(">II", 4 + len(header), len(header)) + header))


def test_a_snapshot_header_over_64_kib_round_trips() -> None:
    """A u16 header length crashed the host (struct.error) once ~1,200 banned peers were listed."""
    status = {"banned": [f"12D3KooW{i:044d}" for i in range(3000)], "silo": False}
    frame = encode_frame(Snapshot(status=status))
    assert len(frame) > 65_536
    assert list(FrameDecoder().feed(frame)) == [Snapshot(status=status)]


def test_a_snapshot_over_the_frame_limit_is_an_ipc_error_not_a_crash() -> None:
    with pytest.raises(IPCError, match="exceeds the IPC limit"):
        encode_frame(Snapshot(status={"junk": "x" * MAX_FRAME_BYTES}))


def test_status_merges_host_and_node_drops_and_defaults_to_silo() -> None:
    assert P2PStatus.from_snapshot({}).silo is True
    snapshot = {
        "peer_id": "12D3KooWabc",
        "peers": [
            {"peer_id": "12D3KooWxyz", "connected_since": 1.0, "msgs_in": 2, "verdicts": {"accepted": 2}}
        ],
        "drops": {"publish_backpressure": 1},
        "silo": False,
    }
    status = P2PStatus.from_snapshot(
        snapshot,
        drops={"node_publish_queue_full": 4, "publish_backpressure": 1},
        restarts=2,
        host_running=True,
    )
    assert status.drops == {"publish_backpressure": 2, "node_publish_queue_full": 4}
    assert status.peers[0].msgs_in == 2 and status.peers[0].verdicts == {"accepted": 2}
    assert (status.silo, status.restarts, status.host_running) == (False, 2, True)


def test_status_lists_banned_peers_with_reason_and_expiry() -> None:
    snapshot = {
        "banned": ["12D3KooWbad"],
        "banned_peers": [
            {"peer_id": "12D3KooWbad", "reason": "bad_signature", "expires_at": 99.0, "bans": 2}
        ],
        "banned_total": 1300,
        "peers_total": 3,
    }
    status = P2PStatus.from_snapshot(snapshot)
    assert status.banned_peers == (BannedPeer("12D3KooWbad", "bad_signature", 99.0, 2),)
    assert (status.banned_total, status.peers_total) == (1300, 3)
    assert P2PStatus.from_snapshot({"banned_peers": snapshot["banned_peers"]}).banned_total == 1
