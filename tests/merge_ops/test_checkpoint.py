"""Checkpoint reading: hostile headers are refused with a typed error naming file and tensor, pickles are
guarded, sharded folders and single files load lazily and exactly."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_ops.checkpoint import Checkpoint, read_safetensors_header, release_pages, torch_dtype
from merge_ops.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    SourceNotFoundError,
    UnsafeCheckpointError,
)
from tests.utils.factories import load_all, make_checkpoint, make_llama_like


def raw_file(path: Path, header: dict | bytes, data: bytes, *, header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def f32_entry(shape: list[int], begin: int) -> dict:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


def test_raw_helper_makes_files_safetensors_and_alloy_accept(tmp_path: Path) -> None:
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    path = raw_file(tmp_path / "ok.safetensors", {"w": f32_entry([2, 3], 0)}, data)
    with Checkpoint.open(path) as ckpt:
        assert ckpt.infos["w"].shape == (2, 3)
        assert torch.equal(ckpt.load("w"), torch.arange(6, dtype=torch.float32).reshape(2, 3))


# Each case: (header or raw header bytes, data bytes, header_len override, tensor named in the message or None)
HOSTILE = {
    "bad_json": (b'{"w": {"dtype": "F32", ', b"", None, None),
    "nesting_bomb": (b"[" * 100_000 + b"]" * 100_000, b"", None, None),
    "huge_integer": (
        b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
        b"",
        None,
        None,
    ),
    "float_shape": ({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4, None, "w"),
    "not_utf8": (b'{"\xff\xfe": 1}', b"", None, None),
    "not_an_object": (b"[1, 2, 3]", b"", None, None),
    "header_len_past_file": ({"w": f32_entry([2], 0)}, b"\0" * 8, 10_000, None),
    "header_len_absurd": ({"w": f32_entry([2], 0)}, b"\0" * 8, 2**62, None),
    "unknown_dtype": ({"w": {"dtype": "F13", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "w"),
    "dtype_not_string": ({"w": {"dtype": 7, "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "w"),
    "negative_dim": ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "w"),
    "shape_not_list": ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8, None, "w"),
    "offsets_past_data": ({"w": f32_entry([4], 0)}, b"\0" * 8, None, "w"),
    "offsets_reversed": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8, None, "w"),
    "offsets_not_pair": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, None, "w"),
    "shape_vs_bytes": ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "w"),
    "overlap": (
        {"a": f32_entry([2], 0), "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        b"\0" * 12,
        None,
        "b",
    ),
    "hole": ({"a": f32_entry([1], 0), "b": f32_entry([1], 8)}, b"\0" * 12, None, "b"),
    "trailing_bytes": ({"a": f32_entry([1], 0)}, b"\0" * 12, None, None),
    "bad_metadata": ({"__metadata__": {"k": 1}, "a": f32_entry([1], 0)}, b"\0" * 4, None, None),
    "duplicate_key": (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b"\0" * 4,
        None,
        None,
    ),
    "entry_not_object": ({"a": [1, 2]}, b"", None, "a"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_refused_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    header, data, header_len, tensor = HOSTILE[case]
    path = raw_file(tmp_path / f"{case}.safetensors", header, data, header_len=header_len)
    with pytest.raises(CorruptCheckpointError) as err:
        Checkpoint.open(path)
    assert str(path) in str(err.value)
    assert err.value.context["file"] == str(path)
    if tensor is not None:
        assert repr(tensor) in str(err.value)
        assert err.value.context["tensor"] == tensor


def test_file_shorter_than_length_field(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CorruptCheckpointError, match="too short") as err:
        read_safetensors_header(path)
    assert str(path) in str(err.value)


def test_truncated_data_names_the_cut_tensor(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", {"a": torch.ones(4), "b": torch.ones(64, 8)})
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(CorruptCheckpointError, match="truncated") as err:
        Checkpoint.open(folder)
    assert err.value.context == {"file": str(path), "tensor": "b"}


def test_error_pickles_and_keeps_context(tmp_path: Path) -> None:
    path = raw_file(
        tmp_path / "x.safetensors", {"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"
    )
    with pytest.raises(CorruptCheckpointError) as err:
        Checkpoint.open(path)
    clone = pickle.loads(pickle.dumps(err.value))
    assert type(clone) is CorruptCheckpointError and clone.context == err.value.context


def test_single_file_and_folder_load_exactly(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 5),
        "h": torch.randn(4).to(torch.bfloat16),
        "i": torch.arange(3),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
    }
    folder = make_checkpoint(tmp_path / "m", tensors, metadata={"note": "hi"})
    for path in (folder, folder / "model.safetensors"):
        with Checkpoint.open(path) as ckpt:
            assert ckpt.metadata["note"] == "hi"
            assert {n: i.dtype for n, i in ckpt.infos.items()} == {
                "w": "F32",
                "h": "BF16",
                "i": "I64",
                "flag": "BOOL",
                "scalar": "F16",
            }
            assert ckpt.infos["scalar"].shape == ()
            for name, tensor in tensors.items():
                assert torch.equal(ckpt.load(name), tensor)
                assert torch_dtype(ckpt.infos[name].dtype) == tensor.dtype


def test_sharded_folder_reads_every_shard(tmp_path: Path) -> None:
    folder = make_llama_like(tmp_path / "m", sharded_max_bytes=2048)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    expected = load_all(folder)
    with Checkpoint.open(folder) as ckpt:
        assert set(ckpt.infos) == set(expected)
        assert {i.file for i in ckpt.infos.values()} == set(shards)
        for name, tensor in expected.items():
            assert torch.equal(ckpt.load(name), tensor)


def test_index_pointing_outside_its_folder_is_unsafe(tmp_path: Path) -> None:
    outside = make_checkpoint(tmp_path / "outside", {"w": torch.ones(2)})
    folder = tmp_path / "m"
    folder.mkdir()
    index = {"weight_map": {"w": "../outside/model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint folder") as err:
        Checkpoint.open(folder)
    assert err.value.context["tensor"] == "w"
    assert outside.exists()


def test_index_problems(tmp_path: Path) -> None:
    folder = make_llama_like(tmp_path / "m", sharded_max_bytes=2048)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != shard)

    index["weight_map"][name] = other  # mapped to a shard that does not hold it
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="does not hold it") as err:
        Checkpoint.open(folder)
    assert err.value.context["tensor"] == name

    index["weight_map"][name] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(SourceNotFoundError, match="missing"):
        Checkpoint.open(folder)

    index_path.write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="index"):
        Checkpoint.open(folder)


def test_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    with pytest.raises(SourceNotFoundError):
        Checkpoint.open(tmp_path / "w.gguf")


def test_unknown_tensor_is_a_typed_error(tmp_path: Path) -> None:
    with (
        Checkpoint.open(make_checkpoint(tmp_path / "m", {"w": torch.ones(2)})) as ckpt,
        pytest.raises(IncompatibleModelsError, match="'v'"),
    ):
        ckpt.load("v")


# ----------------------------------------------------------------------------------------------- pickles


def test_pickle_refused_without_allow_pickle(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)
    for target in (path, tmp_path):
        with pytest.raises(UnsafeCheckpointError, match="allow_pickle") as err:
            Checkpoint.open(target)
        assert err.value.context["file"] == str(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_allowed_loads_with_weights_only(tmp_path: Path, zip_format: bool) -> None:
    tensors = {"w": torch.randn(3, 2), "i": torch.arange(4), "h": torch.randn(2).half()}
    path = tmp_path / "model.pt"
    # non-tensor entries are dropped; the legacy format can't be memory-mapped and is read whole
    torch.save({**tensors, "step": 7}, path, _use_new_zipfile_serialization=zip_format)
    with Checkpoint.open(path, allow_pickle=True) as ckpt:
        assert set(ckpt.infos) == set(tensors)
        assert ckpt.infos["h"].dtype == "F16"
        for name, tensor in tensors.items():
            assert torch.equal(ckpt.load(name), tensor)


def test_sharded_pickle_folder(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpointError):
        Checkpoint.open(tmp_path)
    with Checkpoint.open(tmp_path, allow_pickle=True) as ckpt:
        assert torch.equal(ckpt.load("b"), torch.zeros(3))
        assert torch.equal(ckpt.load("a"), torch.ones(2))


class _Exploit:
    def __reduce__(self):  # runs at unpickling time under a plain pickle.load
        return (os.system, ("touch PWNED",))


def test_hostile_pickle_is_refused_even_when_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(1), "x": _Exploit()}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights-only") as err:
        Checkpoint.open(path, allow_pickle=True)
    assert err.value.context["file"] == str(path)
    assert not (tmp_path / "PWNED").exists()


def test_garbage_pickle_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"definitely not a pickle")
    with pytest.raises((CorruptCheckpointError, UnsafeCheckpointError)) as err:
        Checkpoint.open(path, allow_pickle=True)
    assert str(path) in str(err.value)


def test_safetensors_written_by_reference_library_round_trips(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(i + 1, 3) for i in range(5)}
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path))
    header = read_safetensors_header(path)
    assert set(header.infos) == set(tensors)


def test_oversized_header_is_refused_before_parsing(tmp_path: Path) -> None:
    from merge_ops.checkpoint import MAX_HEADER_BYTES

    # 50 MB of __metadata__: valid JSON that safetensors itself accepts, refused here by its length alone
    header = {"__metadata__": {"pad": "x" * (MAX_HEADER_BYTES + 1)}, "w": f32_entry([2], 0)}
    path = raw_file(tmp_path / "big.safetensors", header, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match="exceeds the"):
        Checkpoint.open(path)


def test_header_is_parsed_once_and_reads_do_not_reopen_it(tmp_path: Path, monkeypatch) -> None:
    import merge_ops.checkpoint as checkpoint

    tensors = {
        "f32": torch.randn(5, 7),
        "bf16": torch.randn(33).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 3).half(),
        "i64": torch.arange(9),
        "flag": torch.tensor([True, False, True]),
        "fp8": torch.randn(16).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"note": "y" * 10_000})
    parsed = []
    real = checkpoint.read_safetensors_header
    monkeypatch.setattr(checkpoint, "read_safetensors_header", lambda p: parsed.append(p) or real(p))
    with Checkpoint.open(tmp_path) as ckpt:
        monkeypatch.setattr(checkpoint, "safe_open", None)  # a read must not go through safetensors' re-parse
        for _ in range(3):
            for name, expected in tensors.items():
                got = ckpt.load(name)
                assert got.dtype == expected.dtype and got.shape == expected.shape
                assert torch.equal(got.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8))
    assert len(parsed) == 1


def test_truncated_after_open_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(1000)}, str(path))
    with Checkpoint.open(path) as ckpt:
        os.truncate(path, path.stat().st_size - 100)
        with pytest.raises(CorruptCheckpointError, match="early"):
            ckpt.load("w")


def test_loaded_tensors_are_private_copies_on_write(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(
        {"w": torch.arange(4096, dtype=torch.float32), "h": torch.ones(3, dtype=torch.float16)}, str(path)
    )
    before = path.read_bytes()
    with Checkpoint.open(path) as ckpt:
        w = ckpt.load("w")
        w.add_(1)  # in place on the mapped tensor: must stay in this process
        assert torch.equal(ckpt.load("w"), torch.arange(4096, dtype=torch.float32))
        assert torch.equal(ckpt.load("h"), torch.ones(3, dtype=torch.float16))
    assert path.read_bytes() == before


def test_released_pages_read_back_from_the_file(tmp_path: Path) -> None:
    """``release_pages`` drops a mapped tensor's pages; the tensor still reads the file's values (the loader
    thread calls it for tensors the merge is done with). A tensor it did not map is left alone."""
    path = tmp_path / "model.safetensors"
    values = torch.randn(3, 70_000, generator=torch.Generator().manual_seed(1))
    save_file({"w": values}, str(path))
    with Checkpoint.open(path) as ckpt:
        w = ckpt.load("w")
        release_pages(w)
        assert torch.equal(w, values)
        release_pages(w[1:])  # a view is not the mapping's tensor: nothing happens
        assert torch.equal(w, values)
    own = values.clone()
    release_pages(own)  # anonymous memory would be zeroed by MADV_DONTNEED: it must not be touched
    assert torch.equal(own, values)
