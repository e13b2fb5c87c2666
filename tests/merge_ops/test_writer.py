"""ShardedWriter: plan-driven shards, index last, exact reload, bounded memory; copy_side_files."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_ops import writer as writer_module
from merge_ops.checkpoint import Checkpoint
from merge_ops.errors import OutputError
from merge_ops.writer import ShardedWriter, WriteBehind, copy_side_files, plan_shards
from tests.utils.factories import make_llama_like


def _tensors(count: int, *, numel: int = 1000) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(numel, generator=gen) for i in range(count)}


def _plan(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def test_plan_larger_than_shard_size_is_sharded_and_reloads_exactly(tmp_path: Path) -> None:
    tensors = _tensors(10)  # 4000 bytes each, 40000 in all
    writer = ShardedWriter(tmp_path / "out", plan=_plan(tensors), shard_size=10_000, metadata={"k": "v"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    paths = writer.close()
    shards = [p for p in paths if p.suffix == ".safetensors"]
    assert [p.name for p in shards] == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert paths[-1].name == "model.safetensors.index.json"  # written last
    index = json.loads(paths[-1].read_text())
    assert index["metadata"]["total_size"] == 40_000
    assert set(index["weight_map"]) == set(tensors)
    for shard in shards:
        assert shard.stat().st_size <= 10_000 + 1024  # data within shard_size, plus a small header
        with safe_open(str(shard), framework="pt") as f:  # the reference reader agrees
            assert f.metadata() == {"format": "pt", "k": "v"}
    with Checkpoint.open(tmp_path / "out") as ckpt:
        for name, tensor in tensors.items():
            assert torch.equal(ckpt.load(name), tensor)


def test_one_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 4).to(torch.bfloat16),
        "b": torch.tensor(True),
        "c": torch.arange(5, dtype=torch.int32),
        "d": torch.empty(0, 3),
        "e": torch.randn(2, 2).to(torch.float8_e4m3fn),
    }
    with ShardedWriter(tmp_path, plan=_plan(tensors), shard_size=10**9, metadata={}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name).view(torch.uint8), tensor.view(torch.uint8))


@pytest.mark.parametrize("direct", [False, True])
def test_headers_come_first_and_tensors_are_not_retained(tmp_path: Path, direct: bool) -> None:
    """Bounded memory: each shard's header is fixed before its data, data reaches the file as it is written
    (the file grows tensor by tensor; with direct I/O, all but the staging buffer's last bytes), and the writer
    keeps no reference to any tensor it was given."""
    plan = [(f"t{i}", torch.float32, (64, 1024)) for i in range(6)]  # 256 KiB each
    writer = ShardedWriter(tmp_path, plan=plan, shard_size=600_000, metadata={}, direct=direct)
    in_user_space = writer_module._STAGING_BYTES if direct else 0
    refs = []
    for i, (name, _, shape) in enumerate(plan):
        tensor = torch.full(shape, float(i))
        writer.write(name, tensor)
        refs.append(weakref.ref(tensor))
        del tensor  # refcounting frees it at once unless the writer kept a reference
        shard = writer.paths[writer._shard_of[i]]
        done_in_shard = sum(1 for j in range(i + 1) if writer._shard_of[j] == writer._shard_of[i])
        assert shard.stat().st_size >= done_in_shard * 64 * 1024 * 4 - in_user_space
    assert all(r() is None for r in refs)
    paths = writer.close()
    assert len(paths) == 4  # 3 shards of 2 tensors + index
    with Checkpoint.open(tmp_path) as ckpt:
        assert float(ckpt.load("t5")[0, 0]) == 5.0


def test_plan_shards_greedy_and_oversized_tensor_alone() -> None:
    plan = [("a", torch.float32, (10,)), ("big", torch.float32, (100,)), ("b", torch.float32, (10,))]
    assert [[e[0] for e in s] for s in plan_shards(plan, shard_size=100)] == [["a"], ["big"], ["b"]]
    assert [[e[0] for e in s] for s in plan_shards(plan, shard_size=10**6)] == [["a", "big", "b"]]


def test_out_of_plan_writes_are_refused(tmp_path: Path) -> None:
    plan = [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]
    writer = ShardedWriter(tmp_path / "x", plan=plan, shard_size=10**6, metadata={})
    with pytest.raises(OutputError, match="expected tensor 'a'"):
        writer.write("b", torch.ones(2))
    with pytest.raises(OutputError, match="planned"):
        writer.write("a", torch.ones(3))
    with pytest.raises(OutputError, match="planned"):
        writer.write("a", torch.ones(2, dtype=torch.float16))
    writer.write("a", torch.ones(2))
    with pytest.raises(OutputError, match="1 of 2"):
        writer.close()
    assert list((tmp_path / "x").iterdir()) == []  # partial shard removed


def test_write_behind_writes_in_order_and_surfaces_errors(tmp_path: Path) -> None:
    """One write in flight: the tensor is written once the returned future is done; a failed write (here: out of
    plan order) raises at the next call, and ``abort`` removes the files."""
    tensors = _tensors(4)
    writes = WriteBehind(ShardedWriter(tmp_path / "ok", plan=_plan(tensors), shard_size=5000, metadata={}))
    for name, tensor in tensors.items():
        scratch = tensor.clone()
        writes.write(name, scratch).result()
        scratch.zero_()  # written already
    paths = writes.close()
    loaded = {}
    for path in paths:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                loaded.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())

    bad = WriteBehind(ShardedWriter(tmp_path / "bad", plan=_plan(tensors), shard_size=5000, metadata={}))
    bad.write("layers.0.weight", tensors["layers.0.weight"])
    bad.write("layers.2.weight", tensors["layers.2.weight"])  # out of order: fails in the writer's thread
    with pytest.raises(OutputError, match="plan order"):
        bad.write("layers.3.weight", tensors["layers.3.weight"])
    bad.abort()
    assert list((tmp_path / "bad").iterdir()) == []


def test_exception_inside_with_removes_partial_files(tmp_path: Path) -> None:
    tensors = _tensors(4)
    with (
        pytest.raises(ZeroDivisionError),
        ShardedWriter(tmp_path, plan=_plan(tensors), shard_size=5000, metadata={}) as w,
    ):
        w.write("layers.0.weight", tensors["layers.0.weight"])
        w.write("layers.1.weight", tensors["layers.1.weight"])
        raise ZeroDivisionError
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_bad_plans(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists"):
        ShardedWriter(tmp_path, plan=[("a", torch.float32, (1,))], shard_size=100, metadata={})
    with pytest.raises(OutputError, match="twice"):
        ShardedWriter(tmp_path / "y", plan=[("a", torch.float32, (1,))] * 2, shard_size=100, metadata={})
    with pytest.raises(ValueError, match="safetensors code"):
        ShardedWriter(tmp_path / "z", plan=[("a", torch.complex64, (1,))], shard_size=100, metadata={})


def test_empty_plan_writes_an_empty_model(tmp_path: Path) -> None:
    paths = ShardedWriter(tmp_path, plan=[], shard_size=100, metadata={}).close()
    assert [p.name for p in paths] == ["model.safetensors"]
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.infos == {}


def test_copy_side_files(tmp_path: Path) -> None:
    src = make_llama_like(tmp_path / "src")
    for name in (
        "generation_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "README.md",
        "merges.txt",
    ):
        (src / name).write_text(name)
    (src / "tokenizer_link.json").symlink_to(src / "tokenizer.json")  # HF cache style links are followed
    copied = copy_side_files(src, tmp_path / "dst")
    assert copied == sorted(copied)
    assert set(copied) == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "merges.txt",
        "tokenizer_link.json",
    }
    assert not (tmp_path / "dst" / "README.md").exists()
    assert not (tmp_path / "dst" / "model.safetensors").exists()
    assert not (tmp_path / "dst" / "tokenizer_link.json").is_symlink()
    assert copy_side_files(src / "model.safetensors", tmp_path / "dst2") == []


_RSS_SCRIPT = """
import resource, sys, torch
from pathlib import Path
from merge_ops.writer import ShardedWriter
plan = [(f"t{i}", torch.float32, (1024, 1024)) for i in range(48)]  # 48 x 4 MiB = 192 MiB
writer = ShardedWriter(Path(sys.argv[1]), plan=plan, shard_size=32 * 2**20, metadata={})
torch.full((1024, 1024), 0.0)  # warm the allocator so the baseline includes one tensor
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for i, (name, _, shape) in enumerate(plan):
    writer.write(name, torch.full(shape, float(i)))
writer.close()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""


@pytest.mark.slow
def test_peak_memory_is_a_few_tensors_not_the_plan(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "out")],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    growth_mib = int(result.stdout.strip())
    assert growth_mib < 48, f"peak RSS grew {growth_mib} MiB while writing 192 MiB"
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 6
