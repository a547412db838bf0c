"""Identity: key file creation and safety, peer id agreement with libp2p, the one-process-per-key lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from swarmnode.identity import (
    Identity,
    IdentityError,
    IdentityLock,
    KeyInUseError,
    init_key,
    peer_id_from_public_key,
    show_key,
    verify,
)


def test_key_file_is_created_with_mode_0600_and_reloads_to_the_same_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "identity.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.peer_id.startswith("12D3KooW")
    assert Identity.load_or_create(path).peer_id == first.peer_id
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temporary file left


def test_peer_id_and_key_pair_match_libp2p(tmp_path: Path) -> None:
    from libp2p.peer.id import ID

    ident = Identity.load_or_create(tmp_path / "k")
    pair = ident.key_pair
    assert ID.from_pubkey(pair.public_key).pretty() == ident.peer_id
    assert pair.public_key.to_bytes() == ident.public_key_bytes
    assert pair.public_key.verify(b"data", ident.sign(b"data"))  # the host key is the signer


def test_sign_and_verify(tmp_path: Path) -> None:
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert verify(ident.public_key_bytes, b"hello", sig)
    assert not verify(ident.public_key_bytes, b"hellO", sig)
    assert not verify(Identity.generate().public_key_bytes, b"hello", sig)
    assert not verify(b"\x00" * 32, b"hello", sig)  # not a usable curve point: False, no exception
    assert not verify(ident.public_key_bytes[:31], b"hello", sig)


def test_world_readable_key_file_is_refused_with_a_fix(tmp_path: Path) -> None:
    path = tmp_path / "k"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match=r"chmod 600"):
        Identity.load(path)


def test_garbage_key_file_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"not a key at all")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not a swarmnode Ed25519 key"):
        Identity.load_or_create(path)


def test_key_file_in_py_libp2p_serialized_form_is_read(tmp_path: Path) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    pair = create_new_key_pair()
    path = tmp_path / "k"
    path.write_bytes(pair.private_key.serialize())
    os.chmod(path, 0o600)
    assert Identity.load(path).peer_id == ID.from_pubkey(pair.public_key).pretty()


def test_init_key_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first = init_key(path)
    assert show_key(path) == first.peer_id
    with pytest.raises(IdentityError, match="--force"):
        init_key(path)
    assert show_key(path) == first.peer_id
    replaced = init_key(path, force=True)
    assert replaced.peer_id != first.peer_id and show_key(path) == replaced.peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_show_key_on_a_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="swarmnode key init"):
        show_key(tmp_path / "missing")


@pytest.mark.integration
def test_lock_refuses_a_second_process_and_frees_when_the_holder_exits(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    Identity.load_or_create(key)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from swarmnode.identity import IdentityLock
            with IdentityLock({str(key)!r}):
                print("locked", flush=True)
                sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(KeyInUseError, match=rf"in use by process {holder.pid}"):
            IdentityLock(key).acquire()
    finally:
        holder.communicate("\n", timeout=30)
    with IdentityLock(key) as lock:  # released on exit
        assert lock.held
    assert not lock.held


def test_init_key_with_force_refuses_while_a_node_holds_the_key(tmp_path: Path) -> None:
    key = tmp_path / "k"
    original = init_key(key).peer_id
    # flock locks are per open file: a second acquire in this process conflicts like another process.
    with IdentityLock(key), pytest.raises(KeyInUseError):
        init_key(key, force=True)
    assert show_key(key) == original


def test_peer_id_rejects_wrong_key_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        peer_id_from_public_key(b"\x01" * 33)


# ---------------------------------------------------------------- unusable key paths: one clear error each


def test_key_init_on_a_directory_is_a_clear_error_with_or_without_force(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    for force in (False, True):
        with pytest.raises(IdentityError, match=r"is a directory, not a key file: pass the file's path"):
            init_key(folder, force=force)
    with pytest.raises(IdentityError, match="is a directory"):
        Identity.load(folder)
    assert list(folder.iterdir()) == []  # nothing written inside it either


def test_key_init_refuses_a_dangling_symlink_and_load_names_its_target(tmp_path: Path) -> None:
    link = tmp_path / "identity.key"
    link.symlink_to(tmp_path / "missing.key")
    with pytest.raises(IdentityError, match=r"is a symbolic link .*never writes through or replaces a link"):
        init_key(link)
    with pytest.raises(IdentityError, match=r"symbolic link to .*missing\.key, which does not exist"):
        Identity.load_or_create(link)
    assert not (tmp_path / "missing.key").exists() and link.is_symlink()


def test_a_symlink_to_a_real_key_loads(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    ident = init_key(real)
    link = tmp_path / "mounted.key"
    link.symlink_to(real)
    assert Identity.load(link).peer_id == ident.peer_id  # keys mounted as links (e.g. k8s secrets) work


def test_a_directory_at_the_lock_path_is_a_clear_error(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    init_key(key)
    (tmp_path / "identity.key.lock").mkdir()
    with pytest.raises(IdentityError, match=r"lock file .*identity\.key\.lock is a directory: .*remove it"):
        IdentityLock(key).acquire()
    with pytest.raises(IdentityError, match="lock file"):
        init_key(key, force=True)


def test_a_symlink_at_the_lock_path_is_not_followed(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    init_key(key)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (tmp_path / "identity.key.lock").symlink_to(victim)
    with pytest.raises(IdentityError, match="is a symbolic link"):
        IdentityLock(key).acquire()
    assert victim.read_text() == "keep me"  # the lock's truncate never reached the link's target


def test_a_huge_key_file_is_refused_from_its_size_without_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big.key"
    with big.open("wb") as f:
        f.truncate(2**30)  # sparse: 1 GiB on paper, nothing on disk
    big.chmod(0o600)
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", counting_read)
    with pytest.raises(IdentityError, match=r"is 1073741824 bytes, not a swarmnode key"):
        Identity.load(big)
    assert reads == []


def test_a_key_whose_parent_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(
        IdentityError, match=r"cannot create the key's directory .*afile: a file is in the way"
    ):
        init_key(tmp_path / "afile" / "identity.key")


@pytest.mark.parametrize("setup", ["directory", "dangling symlink", "lock directory"])
def test_key_init_from_the_command_line_gives_one_line_and_exit_2(tmp_path: Path, setup: str) -> None:
    key = tmp_path / "identity.key"
    if setup == "directory":
        key.mkdir()
    elif setup == "dangling symlink":
        key.symlink_to(tmp_path / "nowhere")
    else:
        init_key(key)
        (tmp_path / "identity.key.lock").mkdir()
    args = ["key", "init", "--path", str(key)] + (["--force"] if setup == "lock directory" else [])
    proc = subprocess.run(
        [sys.executable, "-m", "swarmnode", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("swarmnode key: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
