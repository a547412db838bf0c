"""A minimal TensorBoard event-file writer (scalars only), so `tensorboard --logdir` works without a
TensorBoard or TensorFlow dependency.

An event file is a sequence of TFRecords: ``uint64 length | uint32 masked_crc32c(length) | data |
uint32 masked_crc32c(data)``, each `data` a serialized ``tensorflow.Event`` protobuf. We encode the
few fields we need by hand: ``Event{wall_time=1 (double), step=2 (int64), file_version=3 (string),
summary=5 (Summary{value=1 (Value{tag=1 (string), simple_value=2 (float)})})}``.
`read_scalars` parses what `EventFileWriter` writes (used by the tests and by nobody else).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

_CRC32C_POLY = 0x82F63B78
_CRC32C_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ _CRC32C_POLY if _crc & 1 else _crc >> 1
    _CRC32C_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 fields are encoded as their two's complement
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(
    wall_time: float, step: int, *, file_version: str | None = None, scalars: dict[str, float] | None = None
) -> bytes:
    """A serialized `Event` with either a file version or scalar summary values."""
    data = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        data += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items()
        )
        data += _length_delimited(5, values)
    return data


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventFileWriter:
    """Writes one `events.out.tfevents.*` file into `logdir` (created if missing)."""

    def __init__(self, logdir: Path, wall_time: float | None = None) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        start = time.time() if wall_time is None else wall_time
        self.path = logdir / f"events.out.tfevents.{int(start)}.{socket.gethostname()}.swarmnode"
        self._fh = self.path.open("wb")
        self._fh.write(tfrecord(encode_event(start, 0, file_version="brain.Event:2")))

    def add_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        finite = {tag: float(v) for tag, v in scalars.items() if v is not None and float(v) == float(v)}
        if finite:
            self._fh.write(
                tfrecord(encode_event(time.time() if wall_time is None else wall_time, step, scalars=finite))
            )

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> EventFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, object]]:
    out, pos = [], 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
        elif wire_type == 1:
            value, pos = struct.unpack_from("<d", data, pos)[0], pos + 8
        elif wire_type == 5:
            value, pos = struct.unpack_from("<f", data, pos)[0], pos + 4
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        out.append((number, value))
    return out


def read_scalars(path: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file; checks every record's checksums."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack_from("<I", data, pos + 8)[0] != masked_crc32c(header):
            raise ValueError(f"{path}: bad length checksum at byte {pos}")
        record = data[pos + 12 : pos + 12 + length]
        if struct.unpack_from("<I", data, pos + 12 + length)[0] != masked_crc32c(record):
            raise ValueError(f"{path}: bad data checksum at byte {pos}")
        pos += 16 + length
        fields = _fields(record)
        step = next((v for n, v in fields if n == 2), 0)
        for number, summary in fields:
            if number != 5:
                continue
            for _, value in _fields(summary):  # type: ignore[arg-type]
                entry = dict(_fields(value))  # type: ignore[arg-type]
                out.append((int(step), entry[1].decode(), float(entry[2])))  # type: ignore[union-attr,arg-type]
    return out
