"""The node's identity: one Ed25519 key that is both its libp2p host key and its rollout signer.

Because the same key signs libp2p messages and swarmnode envelopes, a receiver can require that
an envelope's signer is the message's authenticated libp2p origin (``peer_id_from_public_key``).

Key file format: the libp2p protobuf ``PrivateKey`` encoding used by go-libp2p and IPFS
(``08 01 12 40`` + 32-byte seed + 32-byte public key), written with mode 0600. Files holding the
32-byte form that py-libp2p's ``PrivateKey.serialize()`` writes are read as well.

Signing and verification use PyNaCl, the library under ``libp2p.crypto.ed25519``; libp2p itself
(about a second to import) is imported only when the host asks for ``Identity.key_pair``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import base58
from nacl.signing import SigningKey, VerifyKey

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# libp2p crypto.proto: KeyType Ed25519 = 1; field 1 (Type, varint), field 2 (Data, bytes).
_PB_ED25519_TYPE = b"\x08\x01"
_PB_PRIVATE_64 = _PB_ED25519_TYPE + b"\x12\x40"
_PB_PRIVATE_32 = _PB_ED25519_TYPE + b"\x12\x20"
_PB_PUBLIC = _PB_ED25519_TYPE + b"\x12\x20"
_MULTIHASH_IDENTITY = b"\x00"
# A key file is 68 bytes (36 in the short form); anything much larger is not one, and is refused
# from its size alone rather than read into memory.
MAX_KEY_FILE_BYTES = 4096


class IdentityError(Exception):
    """The key file is missing, unreadable, malformed or unsafe; the message says what to do."""


class KeyInUseError(IdentityError):
    """Another running process holds this key: two nodes must not share one identity."""


@functools.lru_cache(maxsize=4096)  # base58 in pure Python: ~10 us per message without it
def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW...``, as ``ID.pretty()``) of a raw 32-byte Ed25519 public key.

    The id is the base58btc identity multihash of the protobuf-encoded public key, exactly as
    libp2p computes it for keys of 42 bytes or less.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"Ed25519 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    encoded = _PB_PUBLIC + public_key
    return base58.b58encode(_MULTIHASH_IDENTITY + bytes([len(encoded)]) + encoded).decode()


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``; never raises."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        VerifyKey(public_key).verify(data, signature)
    except Exception:  # BadSignatureError, or PyNaCl's errors for bytes that are not a curve point
        return False
    return True


class Identity:
    """An Ed25519 key pair with its libp2p peer id."""

    def __init__(self, signing_key: SigningKey, path: Path | None = None) -> None:
        self._signing_key = signing_key
        self.path = path
        self.public_key_bytes: bytes = bytes(signing_key.verify_key)
        self.peer_id: str = peer_id_from_public_key(self.public_key_bytes)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity, not saved anywhere (tests, ephemeral nodes)."""
        return cls(SigningKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Read an existing key file; raises IdentityError with what to do when it is unusable.

        A symbolic link is followed (keys are often mounted as links, e.g. Kubernetes secrets); its
        target must be a regular file of at most MAX_KEY_FILE_BYTES, readable by its owner only."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO planted here cannot hang us
        except FileNotFoundError:
            if path.is_symlink():
                raise IdentityError(
                    f"key file {path} is a symbolic link to {os.readlink(path)}, which does not exist: "
                    "fix the link, or remove it and run `swarmnode key init`"
                ) from None
            raise IdentityError(
                f"key file {path} does not exist: create it with `swarmnode key init`"
            ) from None
        except IsADirectoryError:
            raise IdentityError(_is_a_directory(path)) from None
        except OSError as exc:
            raise IdentityError(f"cannot read key file {path}: {exc.strerror or exc}") from None
        with contextlib.closing(_RawFile(fd)) as f:
            info = os.fstat(fd)  # of the file opened, not of whatever the path names a moment later
            if stat.S_ISDIR(info.st_mode):
                raise IdentityError(_is_a_directory(path))
            if not stat.S_ISREG(info.st_mode):
                raise IdentityError(
                    f"key file {path} is not a regular file: point p2p.key_path at the key file"
                )
            if info.st_mode & 0o077:
                raise IdentityError(
                    f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}: it must be readable by its "
                    f"owner only; run `chmod 600 {path}`"
                )
            if info.st_size > MAX_KEY_FILE_BYTES:
                raise IdentityError(
                    f"key file {path} is {info.st_size} bytes, not a swarmnode key (68 bytes): check "
                    "p2p.key_path, or move the file away and run `swarmnode key init` (a new peer id)"
                )
            try:
                data = f.read(MAX_KEY_FILE_BYTES + 1)  # one call: a regular file this small is read whole
            except OSError as exc:
                raise IdentityError(f"cannot read key file {path}: {exc.strerror or exc}") from None
        return cls(_decode_private_key(data, path), path)

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        """Load the key file, creating it (mode 0600, atomically) on first run."""
        path = Path(path)
        if not path.exists():
            with contextlib.suppress(FileExistsError):  # another process created it first: use theirs
                _write_new_key(path, SigningKey.generate(), overwrite=False)
        return cls.load(path)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._signing_key.sign(data).signature

    @property
    def key_pair(self) -> KeyPair:
        """The same key as a libp2p ``KeyPair``, for the libp2p host (imports libp2p)."""
        from libp2p.crypto.ed25519 import Ed25519PrivateKey
        from libp2p.crypto.keys import KeyPair

        private = Ed25519PrivateKey(self._signing_key)
        return KeyPair(private, private.get_public_key())

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r}, path={str(self.path) if self.path else None!r})"


def _encode_private_key(key: SigningKey) -> bytes:
    return _PB_PRIVATE_64 + bytes(key) + bytes(key.verify_key)


def _decode_private_key(data: bytes, path: Path) -> SigningKey:
    hint = (
        f"key file {path} is not a swarmnode Ed25519 key ({{}}); restore it from a backup, or move it "
        f"away and run `swarmnode key init` (this creates a new peer id)"
    )
    if len(data) == len(_PB_PRIVATE_64) + 64 and data.startswith(_PB_PRIVATE_64):
        seed, public = data[4:36], data[36:]
        key = SigningKey(seed)
        if bytes(key.verify_key) != public:
            raise IdentityError(hint.format("its public key does not match its private key"))
        return key
    if len(data) == len(_PB_PRIVATE_32) + 32 and data.startswith(_PB_PRIVATE_32):
        return SigningKey(data[4:])
    raise IdentityError(hint.format(f"{len(data)} bytes of unexpected content"))


class _RawFile:
    """An open descriptor that `os.fdopen` would refuse (a directory) still needs closing."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, n: int) -> bytes:
        return os.read(self.fd, n)

    def close(self) -> None:
        os.close(self.fd)


def _is_a_directory(path: Path) -> str:
    return (
        f"key path {path} is a directory, not a key file: pass the file's path "
        f"(e.g. {path / 'identity.key'}), or remove the directory"
    )


def _write_new_key(path: Path, key: SigningKey, *, overwrite: bool) -> None:
    """Write the key with mode 0600 via a temporary file, so no reader sees a partial key.

    Without ``overwrite`` the final step is a hard link, which fails with FileExistsError when the
    path appeared meanwhile (or is a dangling symbolic link); with it, an atomic rename replaces
    the old key. Any other failure is an IdentityError saying what to change.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = (
            "a file is in the way"
            if isinstance(exc, FileExistsError | NotADirectoryError)
            else (exc.strerror or str(exc))
        )
        raise IdentityError(
            f"cannot create the key's directory {path.parent}: {reason}; choose another path "
            "(--path or p2p.key_path)"
        ) from None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_encode_private_key(key))
                f.flush()
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    except FileExistsError:
        if overwrite:
            raise IdentityError(
                f"cannot write key file {path}: a stale {tmp} is in the way; remove it"
            ) from None
        raise
    except IsADirectoryError:
        raise IdentityError(_is_a_directory(path)) from None
    except OSError as exc:
        raise IdentityError(
            f"cannot write key file {path}: {exc.strerror or exc}; choose a writable path (--path or "
            "p2p.key_path)"
        ) from None


def init_key(path: str | Path, force: bool = False) -> Identity:
    """``swarmnode key init``: create a new key file; refuses to replace an existing one without force."""
    path = Path(path)
    if path.is_symlink():
        raise IdentityError(
            f"{path} is a symbolic link (to {os.readlink(path)}): `swarmnode key init` never writes "
            "through or replaces a link; remove it, or pass the real file's path with --path"
        )
    if path.is_dir():
        raise IdentityError(_is_a_directory(path))
    if path.exists() and not force:
        existing = ""
        with contextlib.suppress(IdentityError):
            existing = f" (peer id {Identity.load(path).peer_id})"
        raise IdentityError(
            f"key file {path} already exists{existing}; replacing it gives this node a new peer id. "
            f"Pass --force to replace it, or choose another --path"
        )
    if force and path.exists():
        with IdentityLock(path):  # never replace a key under a running node
            _write_new_key(path, SigningKey.generate(), overwrite=True)
    else:
        try:
            _write_new_key(path, SigningKey.generate(), overwrite=False)
        except FileExistsError:
            raise IdentityError(
                f"key file {path} appeared while it was being created; run the command again"
            ) from None
    return Identity.load(path)


def show_key(path: str | Path) -> str:
    """``swarmnode key show``: the peer id of an existing key file."""
    return Identity.load(path).peer_id


class IdentityLock:
    """An exclusive lock on a key file, so two node processes never run with the same identity.

    The lock is ``fcntl.flock`` on ``<key>.lock`` (the lock file holds the owner's PID, for the
    error message). The kernel releases it when the process exits, even on SIGKILL, so a crashed
    node never leaves a stale lock behind. Use as a context manager or ``acquire()``/``release()``.
    """

    def __init__(self, key_path: str | Path) -> None:
        self.key_path = Path(key_path)
        self.lock_path = self.key_path.with_name(self.key_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> IdentityLock:
        if self._fd is not None:
            return self
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: the lock file is truncated below, so a link planted here must not be followed.
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            kind = (
                "a directory"
                if self.lock_path.is_dir()
                else "a symbolic link"
                if self.lock_path.is_symlink()
                else ""
            )
            problem = f"is {kind}" if kind else f"cannot be opened ({exc.strerror or exc})"
            raise IdentityError(
                f"lock file {self.lock_path} {problem}: swarmnode keeps a plain lock file next to the key; "
                "remove it, or choose another key path"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise KeyInUseError(
                f"key {self.key_path} is in use by process {owner}: another swarmnode node is running "
                f"with this identity. Stop it, or give this node its own key (set p2p.key_path or "
                f"--data-dir, then `swarmnode key init`)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # The file stays: unlinking a lock file lets two processes lock two different inodes.
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> IdentityLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
