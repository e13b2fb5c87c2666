"""ShardedWriter's two ways to the disk. Buffered: each shard's disk write-back is started as tensors are written
(Linux ``sync_file_range``), so the fsync at the end of a merge finds little left; the output is byte-for-byte
what it was without the hint. Direct I/O (the default where the file system takes it): through an aligned
staging buffer, the same bytes, and a refusal halfway falls back to buffered writes."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_ops import writer as writer_module
from merge_ops.writer import ShardedWriter


def _write(directory: Path, tensors: dict[str, torch.Tensor], shard_size: int) -> list[int]:
    """Write ``tensors``; return, after each one, the offset up to which its shard's write-back was started."""
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    out = ShardedWriter(directory, plan=plan, shard_size=shard_size, direct=False)
    starts = []
    for name, tensor in tensors.items():
        out.write(name, tensor)
        assert out._file is not None and not out._file.direct
        starts.append(out._file._writeback_from)
    out.close()
    return starts


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    # 3 × 12 MiB of bf16: more than the 8 MiB after which write-back is started
    return {f"t{i}": torch.randn(6 * 2**20, generator=gen).bfloat16() for i in range(3)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_started_per_shard_and_output_is_exact(tmp_path: Path) -> None:
    tensors = _tensors()
    starts = _write(tmp_path / "out", tensors, shard_size=25 * 2**20)  # two shards: t0 t1 | t2
    assert writer_module._sync_file_range is not None
    # started up to the end of each written tensor (the first shard's header is still in the buffer, or not)
    assert starts[0] >= 12 * 2**20 and starts[1] >= 24 * 2**20
    assert 12 * 2**20 <= starts[2] < 13 * 2**20  # the second shard counts from its own start
    loaded = {}
    for path in sorted((tmp_path / "out").glob("*.safetensors")):
        loaded.update(load_file(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].view(torch.int16), tensor.view(torch.int16))


def test_refused_writeback_leaves_the_output_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def refused(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((offset, nbytes))
        return -1

    monkeypatch.setattr(writer_module, "_sync_file_range", refused)
    tensors = _tensors()
    starts = _write(tmp_path / "out", tensors, shard_size=10**9)
    assert calls and starts == [0, 0, 0]  # asked every time, never recorded as started
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].view(torch.int16), tensor.view(torch.int16))


def _load(directory: Path) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        loaded.update(load_file(path))
    return loaded


def _odd_sized() -> dict[str, torch.Tensor]:
    """Tensors whose sizes put every later one at an unaligned offset, one of them ten staging buffers long."""
    gen = torch.Generator().manual_seed(11)
    return {
        "a": torch.randn(1001, generator=gen),
        "b": torch.randn(5 * 2**20 + 3, generator=gen).bfloat16(),  # 10 MiB + 6 bytes
        "c": torch.randint(0, 255, (77,), dtype=torch.uint8, generator=gen),
        "d": torch.randn(3, 333, generator=gen).half(),
    }


@pytest.mark.parametrize("shard_size", [10**9, 4 * 2**20])
def test_direct_and_buffered_writes_give_the_same_bytes(tmp_path: Path, shard_size: int) -> None:
    tensors = _odd_sized()
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    for direct in (True, False):
        with ShardedWriter(tmp_path / str(direct), plan=plan, shard_size=shard_size, direct=direct) as out:
            for name, tensor in tensors.items():
                out.write(name, tensor)
    files = sorted(p.name for p in (tmp_path / "True").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "False").iterdir())
    for name in files:
        assert (tmp_path / "True" / name).read_bytes() == (tmp_path / "False" / name).read_bytes()
    loaded = _load(tmp_path / "True")
    assert all(torch.equal(loaded[n].view(torch.uint8), t.view(torch.uint8)) for n, t in tensors.items())


def test_a_refused_direct_write_goes_on_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that takes O_DIRECT at open but refuses its writes (EINVAL) gets the shard buffered from
    the refused write on (the staging buffer's first flush, inside tensor b), the bytes unchanged."""
    real_pwrite = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    tensors = _odd_sized()
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    direct_after: dict[str, bool] = {}
    with ShardedWriter(tmp_path / "out", plan=plan, shard_size=10**9) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)
            assert out._file is not None
            direct_after[name] = out._file.direct
    if not refused:
        pytest.skip("this file system refuses O_DIRECT at open: every write was buffered already")
    assert refused == [0]  # one refusal, then buffered
    assert direct_after == {"a": True, "b": False, "c": False, "d": False}
    loaded = _load(tmp_path / "out")
    assert all(torch.equal(loaded[n].view(torch.uint8), t.view(torch.uint8)) for n, t in tensors.items())
