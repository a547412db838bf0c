"""docs/PROTOCOL.md stays true: its generated blocks are rebuilt from the code and compared.

The blocks between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->`` are
the worked byte-level example (envelope, signing digest, message id), the caps, the windows, the
validation rules in order and the verdict policy (action, penalty, who is blamed). When the code
changes, this test fails and names the block; rewrite the blocks with

    python tests/test_protocol_doc.py --write
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import string
import struct
import sys
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from swarmnode.config import P2PConfig
from swarmnode.identity import Identity
from swarmnode.p2p import pipeline as pipeline_module
from swarmnode.p2p.pipeline import Reason, ValidationPipeline
from swarmnode.p2p.scoring import PeerScores
from swarmnode.wire import (
    Compression,
    Kind,
    NodeHeartbeat,
    WireCaps,
    decode_message,
    encode_heartbeat,
    message_id,
    open_envelope,
    payload_cap,
    seal,
    signing_digest,
    verify_envelope,
)

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
_BLOCK = re.compile(r"<!-- BEGIN generated: (\w+) -->\n(.*?)<!-- END generated: \1 -->", re.DOTALL)

EXAMPLE_SEED = bytes(range(32))
EXAMPLE_HEARTBEAT = NodeHeartbeat(
    name="n1", model_id="", node_round=1, sequence=1_700_000_000_000, created_at=1_700_000_000.0
)


def _hex_lines(data: bytes, indent: str = "    ", width: int = 32) -> str:
    return "\n".join(indent + data[i : i + width].hex() for i in range(0, len(data), width))


def worked_example() -> str:
    """A heartbeat sealed without compression by the key whose seed is bytes 0x00..0x1f."""
    identity = Identity(SigningKey(EXAMPLE_SEED))
    payload = encode_heartbeat(EXAMPLE_HEARTBEAT)
    envelope = seal(identity, Kind.HEARTBEAT, payload, compression=Compression.NONE)
    opened = open_envelope(envelope, WireCaps())
    assert verify_envelope(opened)
    header = struct.pack(">III", 1, int(Kind.HEARTBEAT), int(Compression.NONE))
    digest_input = b"swarmnode/v1/envelope\x00" + header + hashlib.sha256(payload).digest()
    digest = signing_digest(1, Kind.HEARTBEAT, Compression.NONE, payload)
    assert digest == hashlib.sha256(digest_input).digest()
    key, signature = identity.public_key_bytes, opened.signature
    fields = [
        ("08 01", "field 1 version = 1"),
        ("10 02", "field 2 kind = 2 (KIND_HEARTBEAT)"),
        ("", "field 3 compression = 0 (COMPRESSION_NONE): the default, so not written"),
        (f"22 {len(payload):02x} <payload>", f"field 4 payload, {len(payload)} bytes"),
        ("2a 20 <public key>", "field 5 signer_public_key, 32 bytes"),
        ("32 40 <signature>", "field 6 signature, 64 bytes"),
    ]
    expected = (
        bytes.fromhex("0801" + "1002" + f"22{len(payload):02x}")
        + payload
        + b"\x2a\x20"
        + key
        + b"\x32\x40"
        + signature
    )
    assert envelope == expected
    layout = "\n".join(f"    {code:<22} {what}" for code, what in fields)
    return f"""```text
Signer: the Ed25519 key with seed 000102...1f (RFC 8032 private key bytes 0x00..0x1f)
  public key       {key.hex()}
  peer id          {identity.peer_id}

Payload: Heartbeat {{ name: "n1", node_round: 1, created_at_ms: 1700000000000,
                     sequence: 1700000000000 }}, serialized ({len(payload)} bytes):
{_hex_lines(payload)}
  sha256(payload)  {hashlib.sha256(payload).hexdigest()}

Signing digest input = "swarmnode/v1/envelope\\x00" || u32be(1) || u32be(2) || u32be(0) || sha256(payload):
{_hex_lines(digest_input)}
  signing digest = sha256(input)
                   {digest.hex()}
  signature = Ed25519-sign(key, signing digest), 64 bytes:
{_hex_lines(signature)}

Envelope ({len(envelope)} bytes), the exact gossipsub message data:
{layout}
{_hex_lines(envelope)}

Message id = sha256(envelope):
    {message_id(envelope).hex()}
```
"""


def caps_table() -> str:
    """Every cap: WireCaps attribute, config key, default, what it bounds."""
    caps = WireCaps.from_config(P2PConfig())
    rows = [
        ("max_message_bytes", "`p2p.max_message_bytes`", "signed envelope as received (bytes)"),
        ("max_groups_per_batch", "`p2p.max_groups_per_batch`", "RolloutBatch.groups"),
        ("max_completions_per_group", "`p2p.max_completions_per_group`", "RolloutGroup.completions"),
        ("max_chars_per_completion", "`p2p.max_chars_per_completion`", "Completion.text (characters)"),
        ("max_question_chars", "`p2p.max_question_chars`", "RolloutGroup.question (characters)"),
        ("max_payload_bytes", "8 x `p2p.max_message_bytes`", "decompressed payload, any kind (bytes)"),
        ("max_tokens_per_completion", "4 x `p2p.max_chars_per_completion`", "Completion.num_tokens"),
        (
            "max_name_chars",
            "fixed",
            "model ids, TaskRef strings, heartbeat strings, counter names (characters)",
        ),
        ("max_heartbeat_entries", "fixed", "Heartbeat.counters entries; Heartbeat.reward_trend points"),
        ("max_unknown_fields", "fixed", "fields this version does not know, per protobuf message"),
    ]
    lines = ["| Cap | Config key | Default | Bounds |", "|---|---|---|---|"]
    lines += [f"| `{attr}` | {key} | {getattr(caps, attr):,} | {what} |" for attr, key, what in rows]
    lines.append(
        f"| RolloutBatch payload cap | derived (below) | {payload_cap(Kind.ROLLOUT_BATCH, caps):,} | "
        "decompressed RolloutBatch (bytes) |"
    )
    lines.append(
        f"| Heartbeat payload cap | derived (below) | {payload_cap(Kind.HEARTBEAT, caps):,} | "
        "decompressed Heartbeat (bytes) |"
    )
    assert {attr for attr, _, _ in rows} == set(caps.__dataclass_fields__)
    return "\n".join(lines) + "\n"


def windows_table() -> str:
    """Time windows and rates of the pipeline and the scores, with their config keys."""
    cfg = P2PConfig()
    pipe = inspect.signature(ValidationPipeline.__init__).parameters
    scores = inspect.signature(PeerScores.__init__).parameters
    max_age, max_future = pipe["max_age_s"].default, pipe["max_future_s"].default
    rows = [
        (
            "Message age (created_at)",
            f"older than {max_age:g} s or more than {max_future:g} s ahead is stale",
            "fixed",
        ),
        (
            "Duplicate window",
            f"an accepted message id is remembered {max_age + max_future:g} s "
            f"(max age + max future), at most {pipe['dedup_size'].default:,} ids",
            "fixed",
        ),
        (
            "Replay window",
            f"per (author, kind): sequences seen, and anything {pipe['replay_window'].default:,} below the highest "
            f"(sequence units: ms), at most {pipe['max_seen_per_peer'].default:,} remembered",
            "fixed",
        ),
        (
            "Author rate",
            f"{cfg.rate_msgs_per_s:g} messages/s, burst {pipe['burst_seconds'].default:g} s worth",
            "`p2p.rate_msgs_per_s`",
        ),
        (
            "Author byte rate",
            f"{cfg.rate_bytes_per_s:,.0f} bytes/s, burst {pipe['burst_seconds'].default:g} s worth",
            "`p2p.rate_bytes_per_s`",
        ),
        (
            "Forwarder (relay) rate",
            f"{pipeline_module.RELAY_RATE_FACTOR:g} x the author message rate, "
            f"{pipeline_module.RELAY_BYTES_FACTOR:g} x the author byte rate",
            "derived",
        ),
        (
            "New authors per forwarder",
            f"burst {pipeline_module.ADMIT_BURST:g}, then {pipeline_module.ADMIT_PER_S:g} per second",
            "fixed",
        ),
        ("Ban threshold", f"score below {cfg.score_threshold:g}", "`p2p.score_threshold`"),
        ("Ban length", f"{cfg.ban_seconds:g} s", "`p2p.ban_seconds`"),
        (
            "Score",
            f"starts at 0, +{scores['accept_reward'].default:g} per accepted message up to "
            f"{scores['max_score'].default:g}, decays to 0 with a {scores['half_life_s'].default:g} s half-life",
            "fixed",
        ),
    ]
    lines = ["| Window / rate | Value | Config key |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {key} |" for name, value, key in rows]
    return "\n".join(lines) + "\n"


def rules_table() -> str:
    """The pipeline's rules in order, each with its ``[VERDICT] condition`` docstring."""
    pipe = ValidationPipeline.from_config(P2PConfig())
    lines = ["| # | Rule | Verdict and condition |", "|---|---|---|"]
    for number, rule in enumerate(pipe.rules, start=1):
        doc = inspect.getdoc(rule.check) or ""
        lines.append(f"| {number} | `{rule.name}` | {doc.splitlines()[0] if doc else ''} |")
    return "\n".join(lines) + "\n"


def policy_table() -> str:
    """Every verdict reason with its action, score penalty and who pays it."""
    lines = ["| Reason | Action | Penalty | Blamed |", "|---|---|---|---|"]
    for reason in Reason:
        blame = reason.blame.value if hasattr(reason, "blame") else "origin"
        lines.append(f"| `{reason.value}` | {reason.action.name} | {reason.penalty:g} | {blame} |")
    return "\n".join(lines) + "\n"


def digest_example() -> str:
    """The config digest of a small chain_sum spec, with its canonical JSON."""
    from swarmnode.tasks.registry import TaskSpec, config_digest, full_config

    config = full_config(TaskSpec("chain_sum", {"min_terms": 2, "max_terms": 3}))
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert digest == config_digest(config)
    return f"""```text
canonical JSON  {canonical}
config_digest   {digest}
```
"""


GENERATORS = {
    "digest": digest_example,
    "example": worked_example,
    "caps": caps_table,
    "windows": windows_table,
    "rules": rules_table,
    "policy": policy_table,
}


def _blocks(text: str) -> dict[str, str]:
    return {name: body for name, body in _BLOCK.findall(text)}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generated_block_matches_the_code(name: str) -> None:
    blocks = _blocks(PROTOCOL_MD.read_text())
    assert name in blocks, f"docs/PROTOCOL.md lacks the generated block {name!r}"
    assert blocks[name] == GENERATORS[name](), (
        f"docs/PROTOCOL.md block {name!r} is out of date: run python tests/test_protocol_doc.py --write"
    )


def test_every_pipeline_rule_states_its_verdict() -> None:
    """Each rule's docstring starts with the verdict it gives, matching the policy of its reasons."""
    for rule in ValidationPipeline.from_config(P2PConfig()).rules:
        doc = inspect.getdoc(rule.check) or ""
        assert re.match(r"\[(REJECT|IGNORE)\] \S", doc), f"rule {rule.name}: {doc!r}"


def test_the_worked_example_opens_as_a_receiver_would() -> None:
    """The example envelope in PROTOCOL.md, parsed from the document's own hex, verifies and decodes."""
    block = _blocks(PROTOCOL_MD.read_text())["example"]
    section = block.split("the exact gossipsub message data:\n")[1].split("\n\n")[0]
    hex_lines = [line.strip() for line in section.splitlines() if set(line.strip()) <= set(string.hexdigits)]
    data = bytes.fromhex("".join(hex_lines))
    env = open_envelope(data, WireCaps())
    assert verify_envelope(env)
    assert decode_message(env, WireCaps()) == EXAMPLE_HEARTBEAT
    assert f"Message id = sha256(envelope):\n    {hashlib.sha256(data).hexdigest()}" in block


def test_the_worked_example_verifies_with_an_independent_ed25519() -> None:
    """The digest recomputed from the document's description, checked with OpenSSL's Ed25519
    (cryptography), not the PyNaCl/libsodium code the node signs with."""
    ed25519 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    payload = encode_heartbeat(EXAMPLE_HEARTBEAT)
    digest = hashlib.sha256(
        b"swarmnode/v1/envelope\x00" + (1).to_bytes(4, "big") + (2).to_bytes(4, "big") + (0).to_bytes(4, "big")
        + hashlib.sha256(payload).digest()
    ).digest()  # fmt: skip
    private = ed25519.Ed25519PrivateKey.from_private_bytes(EXAMPLE_SEED)
    public = private.public_key().public_bytes_raw()
    signature = private.sign(digest)
    block = _blocks(PROTOCOL_MD.read_text())["example"]
    assert public.hex() in block and digest.hex() in block
    assert signature.hex()[:64] in block and signature.hex()[64:] in block
    env = seal(Identity(SigningKey(EXAMPLE_SEED)), Kind.HEARTBEAT, payload, compression=Compression.NONE)
    assert open_envelope(env, WireCaps()).signature == signature
    # The peer id is base58btc(identity multihash of the libp2p protobuf PublicKey {Type: Ed25519, Data}).
    import base58

    peer_id = base58.b58encode(b"\x00\x24" + b"\x08\x01\x12\x20" + public).decode()
    assert f"peer id          {peer_id}" in block


def write() -> None:
    text = PROTOCOL_MD.read_text()
    for name, generate in GENERATORS.items():
        body = generate()
        text, count = re.subn(
            rf"(<!-- BEGIN generated: {name} -->\n).*?(<!-- END generated: {name} -->)",
            lambda m, body=body: m.group(1) + body + m.group(2),
            text,
            flags=re.DOTALL,
        )
        if count != 1:
            raise SystemExit(f"docs/PROTOCOL.md needs exactly one block named {name!r} (found {count})")
    PROTOCOL_MD.write_text(text)
    print(f"rewrote {len(GENERATORS)} generated blocks in {PROTOCOL_MD}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        for name, generate in GENERATORS.items():
            print(f"<!-- BEGIN generated: {name} -->\n{generate()}<!-- END generated: {name} -->\n")
