"""ShardedWriter starts each shard's disk write-back as tensors are written (Linux ``sync_file_range``), so the
fsync at the end of a merge finds little left; the output is byte-for-byte what it was without the hint."""

from __future__ import annotations

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
    out = ShardedWriter(directory, plan=plan, shard_size=shard_size)
    starts = []
    for name, tensor in tensors.items():
        out.write(name, tensor)
        starts.append(out._writeback_from)
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
