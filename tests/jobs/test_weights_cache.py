"""The weights hash kept between runs: the same digest as reading every file, read again
only when a file's version (path, size, mtime, inode) changed."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from jobs import weights_cache


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    for name, data in (("a.safetensors", b"A" * 3000), ("b.safetensors", b"B" * 10)):
        (model / name).write_bytes(data)
    return sorted(model.iterdir())


@pytest.fixture
def reads(monkeypatch):
    """How often the files were hashed (read whole)."""
    count = []
    real = weights_cache._sha256
    monkeypatch.setattr(weights_cache, "_sha256", lambda files: count.append(1) or real(files))
    return count


def plain_sha256(files) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_a_second_look_reads_no_file_and_gives_the_same_digest(checkpoint, reads):
    first = weights_cache.weights_sha256(checkpoint)
    assert first == plain_sha256(checkpoint)
    assert weights_cache.weights_sha256(checkpoint) == first
    assert len(reads) == 1
    assert weights_cache.cache_file().is_file()


@pytest.mark.parametrize("change", ["mtime", "size", "inode"])
def test_a_changed_file_is_hashed_again(checkpoint, reads, change):
    before = weights_cache.weights_sha256(checkpoint)
    path = checkpoint[0]
    st = os.stat(path)
    if change == "mtime":  # same bytes, touched
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif change == "size":
        path.write_bytes(b"A" * 3001)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a copy that kept the time
    else:  # replaced by a new file with the same bytes and time
        data = path.read_bytes()
        path.unlink()
        (path.parent / "other").write_bytes(b"x")  # so the new file cannot reuse the inode at once
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        if os.stat(path).st_ino == st.st_ino:
            pytest.skip("the filesystem gave the new file the old inode")
    after = weights_cache.weights_sha256(checkpoint)
    assert len(reads) == 2
    assert after == plain_sha256(checkpoint)
    assert (after == before) == (change != "size")


def test_an_unusable_cache_costs_a_rehash_not_the_run(checkpoint, reads, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache directory cannot be made
    assert weights_cache.weights_sha256(checkpoint) == plain_sha256(checkpoint)
    assert weights_cache.weights_sha256(checkpoint) == plain_sha256(checkpoint)
    assert len(reads) == 2


def test_a_rewritten_checkpoint_keeps_one_entry_and_other_checkpoints_keep_theirs(checkpoint, tmp_path):
    other = tmp_path / "other-model" / "c.safetensors"
    other.parent.mkdir()
    other.write_bytes(b"C" * 50)
    weights_cache.weights_sha256([other])
    for night in range(3):  # a checkpoint written again every night
        checkpoint[0].write_bytes(b"A" * (3000 + night))
        weights_cache.weights_sha256(checkpoint)
    entries = json.loads(weights_cache.cache_file().read_text())
    assert sorted(entries) == sorted(
        "\n".join(weights_cache.file_key(p) for p in files) for files in (checkpoint, [other])
    )


def test_an_entry_whose_file_is_gone_is_dropped(checkpoint, tmp_path):
    gone = tmp_path / "gone.safetensors"
    gone.write_bytes(b"G")
    weights_cache.weights_sha256([gone])
    gone.unlink()
    weights_cache.weights_sha256(checkpoint)
    assert list(json.loads(weights_cache.cache_file().read_text())) == [
        "\n".join(weights_cache.file_key(p) for p in checkpoint)
    ]
