"""merge_ops.hub against the local Hub server, through the real huggingface_hub client (never patched)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import yaml

from merge_ops.errors import (
    HubAccessError,
    HubConflictError,
    HubNotFoundError,
    HubTransientError,
    OutputError,
    SourceNotFoundError,
    UnsafeCheckpointError,
)
from merge_ops.hub import HubClient, select_files
from merge_ops.modelcard import front_matter, with_front_matter
from merge_ops.recipe import HubOutput, HubSource, parse_source
from tests.utils.factories import make_checkpoint
from tests.utils.hub_server import READ_TOKEN, WRITE_TOKEN, HubServer

# hub_server / hub_client fixtures (also meant for tests/conftest.py: pytest_plugins = ["tests.utils.hub_fixtures"])
pytest_plugins = ["tests.utils.hub_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _model(folder: Path, *, seed: int = 0, sharded: bool = True) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "embed.weight": torch.randn(8, 4, generator=gen),
        "layers.0.weight": torch.randn(4, 4, generator=gen),
        "layers.1.weight": torch.randn(4, 4, generator=gen),
        "norm.weight": torch.randn(4, generator=gen),
    }
    return make_checkpoint(folder, tensors, sharded_max_bytes=200 if sharded else None)


def _client(server: HubServer, cache: Path, *, token: str | None = WRITE_TOKEN, **options) -> HubClient:
    options = {"backoff_s": 0.01, "timeout_s": 5.0, **options}
    return HubClient(token=token, cache_dir=cache, endpoint=server.url, **options)


def _resolve_gets(server: HubServer) -> list[str]:
    return [r.path for r in server.requests(method="GET", path_contains="/resolve/")]


@pytest.fixture
def base_repo(hub_server: HubServer, tmp_path: Path) -> tuple[str, Path]:
    """alloy/base: a sharded model plus files a merge must not download."""
    model = _model(tmp_path / "base")
    (model / "generation_config.json").write_text('{"do_sample": false}')
    hub_server.create_repo("alloy/base")
    hub_server.upload_folder("alloy/base", model)
    hub_server.upload(
        "alloy/base",
        {
            "README.md": b"---\nlicense: apache-2.0\n---\n# base\n",
            "training_args.bin": b"\x80\x04pickle",
            "images/plot.png": b"\x89PNG",
            "pytorch_model.bin": b"\x80\x04pickle",
        },
    )
    return "alloy/base", model


# -- resolve ----------------------------------------------------------------------------------------------
def test_resolve_pins_branch_tag_and_sha(hub_server: HubServer, hub_client: HubClient, base_repo) -> None:
    first = hub_server.head("alloy/base")
    hub_server.create_tag("alloy/base", "v1")
    second = hub_server.upload("alloy/base", {"config.json": b'{"model_type": "tiny", "v": 2}'})
    assert hub_client.resolve(HubSource(repo="alloy/base")).revision == second
    assert hub_client.resolve(HubSource(repo="alloy/base", revision="v1")).revision == first
    assert hub_client.resolve(HubSource(repo="alloy/base", revision=first)).revision == first
    parsed = parse_source("hf://alloy/base@v1")
    assert hub_client.resolve(parsed) == HubSource(repo="alloy/base", revision=first)


def test_fetch_reads_the_pinned_commit_after_the_branch_moves(hub_server, hub_client, base_repo) -> None:
    _, model = base_repo
    pinned = hub_client.resolve(HubSource(repo="alloy/base"))
    hub_server.upload_folder("alloy/base", _model(model.parent / "newer", seed=7))  # main moves on
    folder = hub_client.fetch(pinned)
    assert folder.name == pinned.revision
    assert _digests(folder) == {k: v for k, v in _digests(model).items()}


# -- fetch --------------------------------------------------------------------------------------------------
def test_fetch_downloads_only_what_a_merge_needs(hub_server, hub_client, base_repo) -> None:
    _, model = base_repo
    folder = hub_client.fetch(HubSource(repo="alloy/base"))
    assert sorted(_digests(folder)) == sorted(_digests(model))  # no README, pickles, images
    assert _digests(folder) == _digests(model)  # the client checks sizes only: compare hashes here
    fetched = {p.rsplit("/", 1)[-1] for p in _resolve_gets(hub_server)}
    assert "pytorch_model.bin" not in fetched and "plot.png" not in fetched


def test_second_fetch_on_the_same_commit_touches_no_network(hub_server, base_repo, tmp_path) -> None:
    cache = tmp_path / "shared-cache"
    pinned = _client(hub_server, cache).resolve(HubSource(repo="alloy/base"))
    first = _client(hub_server, cache).fetch(pinned)
    hub_server.clear_log()
    second = _client(hub_server, cache).fetch(pinned)  # another worker, same cache
    assert second == first
    assert hub_server.requests() == []


def test_concurrent_fetches_download_each_file_once(hub_server, base_repo, tmp_path) -> None:
    _, model = base_repo
    cache = tmp_path / "shared-cache"
    pinned = _client(hub_server, cache).resolve(HubSource(repo="alloy/base"))
    hub_server.clear_log()
    results: list[Path] = []
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            results.append(_client(hub_server, cache).fetch(pinned))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1
    assert _digests(results[0]) == _digests(model)
    gets = _resolve_gets(hub_server)
    assert len(gets) == len(set(gets)) == len(_digests(model))  # every file once across the four workers


def test_fetch_subfolder(hub_server, hub_client, tmp_path) -> None:
    hub_server.create_repo("alloy/multi")
    hub_server.upload_folder("alloy/multi", _model(tmp_path / "a", seed=1), path_in_repo="a")
    hub_server.upload_folder("alloy/multi", _model(tmp_path / "b", seed=2, sharded=False), path_in_repo="b")
    folder = hub_client.fetch(parse_source("hf://alloy/multi/b@main"))
    assert folder.name == "b" and _digests(folder) == _digests(tmp_path / "b")
    assert not any("/a/" in p for p in _resolve_gets(hub_server))
    with pytest.raises(HubNotFoundError, match="no folder"):
        hub_client.resolve(HubSource(repo="alloy/multi", subfolder="c"))


def test_private_repo_uses_the_callers_token(hub_server, tmp_path) -> None:
    hub_server.create_repo("alloy/private", private=True)
    hub_server.upload_folder("alloy/private", _model(tmp_path / "m"))
    folder = _client(hub_server, tmp_path / "c1").fetch(HubSource(repo="alloy/private"))
    assert _digests(folder) == _digests(tmp_path / "m")
    assert all(r.authorization for r in hub_server.requests())
    with pytest.raises(HubAccessError):  # anonymous: the Hub answers 401
        _client(hub_server, tmp_path / "c2", token=None).fetch(HubSource(repo="alloy/private"))
    with pytest.raises(HubNotFoundError):  # a token without access: 404, like a missing repo
        _client(hub_server, tmp_path / "c3", token=READ_TOKEN).fetch(HubSource(repo="alloy/private"))


def test_gated_repo_without_access_is_an_access_error(hub_server, tmp_path) -> None:
    hub_server.create_repo("alloy/gated", gated=True)
    hub_server.upload_folder("alloy/gated", _model(tmp_path / "m"))
    with pytest.raises(HubAccessError, match="gated") as caught:
        _client(hub_server, tmp_path / "c", token=READ_TOKEN).fetch(HubSource(repo="alloy/gated"))
    assert caught.value.context["status"] == 403
    assert _client(hub_server, tmp_path / "c").fetch(HubSource(repo="alloy/gated")).is_dir()  # granted token


def test_missing_repo_and_revision_are_not_found(hub_server, hub_client, base_repo) -> None:
    with pytest.raises(HubNotFoundError, match="repository not found"):
        hub_client.resolve(HubSource(repo="alloy/nope"))
    with pytest.raises(HubNotFoundError, match="revision not found") as caught:
        hub_client.fetch(HubSource(repo="alloy/base", revision="no-such-branch"))
    assert caught.value.code == "hub_not_found" and caught.value.context["missing"] == "revision"
    with pytest.raises(HubNotFoundError):
        hub_client.fetch(HubSource(repo="alloy/base", revision="0" * 40))


def test_invalid_token_is_an_access_error_and_never_shown(hub_server, base_repo, tmp_path, caplog) -> None:
    secret = "hf_totally_secret_value"
    client = _client(hub_server, tmp_path / "c", token=secret)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubAccessError) as caught:
        client.fetch(HubSource(repo="alloy/base"))
    assert len(hub_server.requests()) == 1  # permanent: no retry
    shown = " ".join([str(caught.value), json.dumps(caught.value.to_dict()), repr(client), caplog.text])
    assert secret not in shown


def test_pickle_only_repo_is_refused_unless_allowed(hub_server, hub_client, tmp_path) -> None:
    hub_server.create_repo("alloy/legacy")
    weights = pickle.dumps({"not": "a tensor"})
    hub_server.upload("alloy/legacy", {"pytorch_model.bin": weights, "config.json": b"{}"})
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle") as caught:
        hub_client.fetch(HubSource(repo="alloy/legacy"))
    assert caught.value.context["files"] == ["pytorch_model.bin"]
    assert _resolve_gets(hub_server) == []  # refused before downloading anything
    folder = hub_client.fetch(HubSource(repo="alloy/legacy"), allow_pickle=True)
    assert (folder / "pytorch_model.bin").read_bytes() == weights


def test_repo_without_weights_is_source_not_found(hub_server, hub_client) -> None:
    hub_server.create_repo("alloy/empty")
    with pytest.raises(SourceNotFoundError, match="no model weights"):
        hub_client.fetch(HubSource(repo="alloy/empty"))


def test_disk_space_is_checked_before_downloading(hub_server, base_repo, tmp_path) -> None:
    client = _client(hub_server, tmp_path / "c", disk_headroom_bytes=2**62)
    with pytest.raises(OutputError, match="not enough disk space") as caught:
        client.fetch(HubSource(repo="alloy/base"))
    assert caught.value.context["needed_bytes"] == sum(p.stat().st_size for p in base_repo[1].iterdir())
    assert _resolve_gets(hub_server) == []


# -- transient faults ---------------------------------------------------------------------------------------
def test_transient_500_and_timeout_are_retried(hub_server, base_repo, tmp_path) -> None:
    hub_server.inject("GET", "/api/models/alloy/base", status=503, times=2)
    hub_server.inject("GET", "/api/models/alloy/base", kind="delay", delay_s=1.5, times=1)
    client = _client(hub_server, tmp_path / "c", timeout_s=0.5, max_attempts=5)
    assert re.fullmatch(r"[0-9a-f]{40}", client.resolve(HubSource(repo="alloy/base")).revision)
    statuses = [r.status for r in hub_server.requests(path_contains="/api/models/alloy/base")]
    assert statuses[:3] == [503, 503, 200]  # the timed-out request is logged whenever its sleep ends


def test_persistent_5xx_gives_up_with_a_transient_error(hub_server, base_repo, tmp_path) -> None:
    hub_server.inject("GET", "/api/models/alloy/base", status=502, times=None)
    with pytest.raises(HubTransientError, match="gave up after 3 attempts") as caught:
        _client(hub_server, tmp_path / "c", max_attempts=3).resolve(HubSource(repo="alloy/base"))
    assert caught.value.transient and caught.value.context["status"] == 502
    assert pickle.loads(pickle.dumps(caught.value)).context == caught.value.context  # crosses Celery


def test_dropped_connection_is_retried(hub_server, base_repo, tmp_path) -> None:
    hub_server.inject("GET", "/api/models/alloy/base", kind="drop", times=1)
    assert _client(hub_server, tmp_path / "c").resolve(HubSource(repo="alloy/base")).revision


def test_download_cut_midway_resumes_with_a_range_read(hub_server, hub_client, tmp_path) -> None:
    # huggingface_hub writes in 10 MiB chunks, so only a cut after the first chunk resumes with a Range read
    big = make_checkpoint(
        tmp_path / "big", {"w": torch.randn(3_000_000, generator=torch.Generator().manual_seed(0))}
    )
    hub_server.create_repo("alloy/big")
    hub_server.upload_folder("alloy/big", big)
    hub_server.inject("GET", "model.safetensors", kind="truncate", after_bytes=11 * 2**20, times=1)
    folder = hub_client.fetch(HubSource(repo="alloy/big"))
    assert _digests(folder) == _digests(big)
    shard_gets = hub_server.requests(method="GET", path_contains="model.safetensors")
    assert [r.status for r in shard_gets] == [200, 206]


def test_download_cut_early_restarts(hub_server, hub_client, base_repo) -> None:
    hub_server.inject("GET", "model-00001-of-00002.safetensors", kind="truncate", after_bytes=50, times=1)
    assert _digests(hub_client.fetch(HubSource(repo="alloy/base"))) == _digests(base_repo[1])
    assert len(hub_server.requests(method="GET", path_contains="model-00001-of-00002")) == 2


def test_download_failing_every_time_names_the_file(hub_server, base_repo, tmp_path) -> None:
    hub_server.inject("GET", "model-00002-of-00002.safetensors", status=500, times=None)
    client = _client(hub_server, tmp_path / "c", max_attempts=3)
    with pytest.raises(HubTransientError, match="model-00002-of-00002.safetensors") as caught:
        client.fetch(HubSource(repo="alloy/base"))
    assert caught.value.context["file"] == "model-00002-of-00002.safetensors"
    assert caught.value.context["attempts"] == 3
    assert len(hub_server.requests(method="GET", path_contains="model-00002-of-00002")) == 3
    hub_server.faults.clear()  # the Hub recovers: the next job completes from the partial cache
    assert _digests(client.fetch(HubSource(repo="alloy/base"))) == _digests(base_repo[1])


@pytest.mark.slow
def test_download_dropping_midway_every_time_fails_with_the_file_named(
    hub_server, base_repo, tmp_path
) -> None:
    # huggingface_hub resumes a cut download itself (5 tries, 1 s apart) before HubClient's own retry.
    hub_server.inject("GET", "model-00001-of-00002.safetensors", kind="truncate", after_bytes=0, times=None)
    with pytest.raises(HubTransientError, match="model-00001-of-00002.safetensors"):
        _client(hub_server, tmp_path / "c", max_attempts=1).fetch(HubSource(repo="alloy/base"))


# -- publish ------------------------------------------------------------------------------------------------
def test_publish_then_pull_back_byte_identical(hub_server, hub_client, base_repo, tmp_path) -> None:
    merged = _model(tmp_path / "merged", seed=3)
    result = hub_client.publish(
        merged,
        HubOutput(repo="alloy/merged", commit_message="merge v1"),
        base_model=["alloy/base", "alloy/ft"],
        method="ties",
    )
    assert result.commit_sha == hub_server.head("alloy/merged")
    assert result.url == f"{hub_server.url}/alloy/merged/commit/{result.commit_sha}"
    assert hub_server.commits[result.commit_sha].message == "merge v1"
    assert hub_server.repos["alloy/merged"].private  # HubOutput.private defaults to True
    commits = hub_server.requests(method="POST", path_contains="/commit/")
    assert len(commits) == 1  # one commit holds everything
    pulled = hub_client.fetch(HubSource(repo="alloy/merged", revision=result.commit_sha))
    assert _digests(pulled) == _digests(merged)
    card = hub_server.read("alloy/merged", "README.md").decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["alloy/base", "alloy/ft"]
    assert front["base_model_relation"] == "merge"
    assert front["tags"] == ["merge", "alloy", "ties"]
    assert front["library_name"] == "transformers"
    assert front["license"] == "apache-2.0"  # from the base's card


def test_publish_keeps_an_existing_card_body_and_its_metadata(hub_server, hub_client, tmp_path) -> None:
    merged = _model(tmp_path / "merged")
    (merged / "README.md").write_text("---\nlicense: mit\ntags: [custom]\n---\n# My merge\n\nDetails.\n")
    hub_client.publish(merged, HubOutput(repo="alloy/carded"), base_model=["alloy/base"], method="ties")
    card = hub_server.read("alloy/carded", "README.md").decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "mit" and front["tags"] == ["merge", "alloy", "ties", "custom"]
    assert card.endswith("# My merge\n\nDetails.\n")


def test_publish_to_a_new_branch_leaves_main_alone(hub_server, hub_client, tmp_path) -> None:
    hub_server.create_repo("alloy/merged")
    main_before = hub_server.head("alloy/merged")
    result = hub_client.publish(_model(tmp_path / "m"), HubOutput(repo="alloy/merged", branch="experiments"))
    assert hub_server.head("alloy/merged", "experiments") == result.commit_sha
    assert hub_server.commits[result.commit_sha].parent == main_before
    assert hub_server.head("alloy/merged") == main_before and result.revision == "experiments"


def test_publish_as_pull_request(hub_server, hub_client, tmp_path) -> None:
    hub_server.create_repo("alloy/merged")
    main_before = hub_server.head("alloy/merged")
    merged = _model(tmp_path / "m")
    result = hub_client.publish(merged, HubOutput(repo="alloy/merged", create_pr=True), method="dare_ties")
    assert result.pr_url == result.url == f"{hub_server.url}/alloy/merged/discussions/1"
    assert (
        result.revision == "refs/pr/1" and hub_server.head("alloy/merged", "refs/pr/1") == result.commit_sha
    )
    assert hub_server.head("alloy/merged") == main_before
    pulled = hub_client.fetch(HubSource(repo="alloy/merged", revision="refs/pr/1"))
    assert _digests(pulled) == _digests(merged)


def test_concurrent_push_is_a_conflict_not_an_overwrite(hub_server, hub_client, tmp_path) -> None:
    hub_server.create_repo("alloy/merged")
    other = {}
    # another push lands between our read of the branch head and our commit
    hub_server.inject(
        "POST",
        "/preupload/",
        kind="hook",
        hook=lambda: other.setdefault("sha", hub_server.upload("alloy/merged", {"theirs.txt": b"x"})),
    )
    with pytest.raises(HubConflictError, match="branch moved"):
        hub_client.publish(_model(tmp_path / "m"), HubOutput(repo="alloy/merged"))
    assert hub_server.head("alloy/merged") == other["sha"]
    assert "model.safetensors.index.json" not in hub_server.files_at("alloy/merged")


def test_commit_whose_reply_was_lost_is_not_pushed_twice(hub_server, hub_client, tmp_path) -> None:
    before = hub_server.create_repo("alloy/merged")
    hub_server.inject("POST", "/commit/", kind="lose_reply", times=1)
    result = hub_client.publish(_model(tmp_path / "m"), HubOutput(repo="alloy/merged"))
    assert result.commit_sha == hub_server.head("alloy/merged")
    assert hub_server.commits[result.commit_sha].parent == before  # exactly one commit landed
    assert len(hub_server.requests(method="POST", path_contains="/commit/")) == 2  # the retry got 412
    assert hub_server.requests(method="GET", path_contains="/commits/")  # ...and found its push id


def test_publish_without_write_access_fails_at_once(hub_server, base_repo, tmp_path) -> None:
    client = _client(hub_server, tmp_path / "c", token=READ_TOKEN)
    with pytest.raises(HubAccessError):
        client.publish(_model(tmp_path / "m"), HubOutput(repo="alloy/merged"))
    assert len(hub_server.requests(path_contains="/api/repos/create")) == 1
    assert "alloy/merged" not in hub_server.repos
    with pytest.raises(HubAccessError):  # an existing repo it can only read: the commit is refused
        client.publish(_model(tmp_path / "m2"), HubOutput(repo="alloy/base"))
    assert hub_server.requests(method="POST", path_contains="/commit/") == []


def test_publish_retries_a_transient_commit_failure(hub_server, hub_client, tmp_path) -> None:
    hub_server.inject("POST", "/api/repos/create", status=503, times=1)
    hub_server.inject("POST", "/preupload/", kind="drop", times=1)
    merged = _model(tmp_path / "m")
    result = hub_client.publish(merged, HubOutput(repo="alloy/merged"))
    assert _digests(hub_client.fetch(HubSource(repo="alloy/merged", revision=result.commit_sha))) == _digests(
        merged
    )


def test_incomplete_folder_is_never_pushed(hub_server, hub_client, tmp_path) -> None:
    merged = _model(tmp_path / "m")
    (merged / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(OutputError, match="missing"):
        hub_client.publish(merged, HubOutput(repo="alloy/merged"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="no safetensors"):
        hub_client.publish(tmp_path / "empty", HubOutput(repo="alloy/merged"))
    assert hub_server.requests() == []


def test_compressed_task_vector_round_trip(hub_server, hub_client, tmp_path) -> None:
    artifact = tmp_path / "tv"
    make_checkpoint(artifact, {"layers.0.weight.mask": torch.ones(2, dtype=torch.uint8)})
    (artifact / "config.json").unlink()
    (artifact / "tokenizer.json").unlink()
    (artifact / "task_vector.json").write_text('{"format": "compeft", "base": "alloy/base"}')
    result = hub_client.push_task_vector(artifact, HubOutput(repo="alloy/tv"), base_model="alloy/base")
    card = yaml.safe_load(hub_server.read("alloy/tv", "README.md").decode().split("---")[1])
    assert {"task-vector", "compeft"} <= set(card["tags"]) and card["base_model"] == ["alloy/base"]
    pulled = hub_client.pull_task_vector(HubSource(repo="alloy/tv", revision=result.commit_sha))
    assert _digests(pulled) == _digests(artifact)


def test_lfs_upload_and_download_round_trip(tmp_path) -> None:
    # The LFS path needs HF_HUB_DISABLE_XET (read at import), so the client runs in a subprocess.
    server = HubServer(tmp_path / "srv", lfs_threshold=256)
    server.add_token(WRITE_TOKEN, write=["alloy"])
    server.start()
    try:
        merged = _model(tmp_path / "merged", sharded=False)
        script = textwrap.dedent(f"""
            import json, sys
            from pathlib import Path
            from merge_ops.hub import HubClient
            from merge_ops.recipe import HubOutput, HubSource
            client = HubClient(token={WRITE_TOKEN!r}, cache_dir=Path({str(tmp_path / "cache")!r}),
                               endpoint={server.url!r}, backoff_s=0.01)
            result = client.publish(Path({str(merged)!r}), HubOutput(repo="alloy/big"), method="ties")
            folder = client.fetch(HubSource(repo="alloy/big", revision=result.commit_sha))
            print(json.dumps({{"sha": result.commit_sha, "folder": str(folder)}}))
        """)
        env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    stored = server.files_at("alloy/big")
    assert stored["model.safetensors"].lfs and not stored["config.json"].lfs
    assert server.requests(method="POST", path_contains=".git/info/lfs/objects/batch")
    assert len(server.requests(method="PUT", path_contains="/lfs-upload/")) == 1
    assert _digests(Path(out["folder"])) == _digests(merged)
    assert out["sha"] == server.head("alloy/big")


# -- pure helpers -------------------------------------------------------------------------------------------
def test_select_files() -> None:
    files = [
        "model.safetensors",
        "pytorch_model.bin",
        "config.json",
        "tokenizer.model",
        "README.md",
        "adapter_config.json",
        "sub/model.safetensors",
        "sub/config.json",
        "optimizer.pt",
    ]
    assert select_files(files) == [
        "adapter_config.json",
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    assert select_files(files, subfolder="sub") == ["sub/config.json", "sub/model.safetensors"]
    assert select_files(["pytorch_model.bin", "config.json"], allow_pickle=True) == [
        "config.json",
        "pytorch_model.bin",
    ]


def test_model_card_metadata_and_render() -> None:
    meta = front_matter(base_model=["org/base"], method="task_arithmetic", license="llama3")
    assert meta == {
        "base_model": ["org/base"],
        "library_name": "transformers",
        "tags": ["merge", "alloy", "task_arithmetic"],
        "license": "llama3",
    }
    card = with_front_matter(meta, body="# Body")
    assert card.startswith("---\n") and card.endswith("# Body\n")
    assert yaml.safe_load(card.split("---")[1]) == meta


def test_cache_dir_and_endpoint_come_from_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("ALLOY_HF_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    client = HubClient()
    assert client.cache_dir == tmp_path / "env-cache" and client.endpoint == "http://127.0.0.1:9"
    assert HubClient(endpoint="http://hub.local", cache_dir=tmp_path).endpoint == "http://hub.local"


def test_existing_card_with_a_single_string_tag() -> None:
    card = with_front_matter({"tags": ["merge", "alloy"]}, existing="---\ntags: mine\n---\nbody\n")
    assert yaml.safe_load(card.split("---")[1])["tags"] == ["merge", "alloy", "mine"]
