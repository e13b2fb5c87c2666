"""Pull sources from and push merged models to the Hugging Face Hub, with the real ``huggingface_hub`` client.

- ``HubClient.resolve`` pins a revision (branch, tag or sha) to its 40-hex commit sha: done at submission, so
  retries and re-runs read the same bytes.
- ``HubClient.fetch`` downloads only what a merge reads (safetensors shards and index, config, tokenizer and
  generation files, adapter files) into a shared cache (``ALLOY_HF_CACHE``). ``hf_hub_download`` takes a file
  lock per blob, so workers fetching the same repo at once download each file once; a completed fetch leaves a
  manifest, so a second job on the same commit touches neither the network nor the disk beyond a stat.
- ``HubClient.publish`` pushes a finished merge as ONE commit based on the branch head (``parent_commit``), so
  a concurrent push fails loudly (``HubConflictError``) instead of being silently overwritten.

Errors: huggingface_hub's typed errors map to ``HubNotFoundError`` / ``HubAccessError`` / ``HubTransientError``
(retried here with exponential backoff first) / ``HubConflictError``. Tokens are never logged or put in errors.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from tqdm.auto import tqdm

from merge_ops.errors import (
    HubAccessError,
    HubConflictError,
    HubError,
    HubNotFoundError,
    HubTransientError,
    OutputError,
    SourceNotFoundError,
    UnsafeCheckpointError,
)
from merge_ops.modelcard import front_matter, with_front_matter
from merge_ops.recipe import HubOutput, HubSource, Recipe

try:  # huggingface_hub >= 2 talks through httpx2; older releases through httpx
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _httpx  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    _httpx.TimeoutException,
    _httpx.NetworkError,
    _httpx.RemoteProtocolError,
    ConnectionError,
    TimeoutError,
)
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
SAFETENSORS_PATTERNS = ("*.safetensors",)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Side files a merge copies or reads: configs, indexes, tokenizer, adapter and task-vector manifests (all *.json).
SIDE_FILE_PATTERNS = (
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.jinja",  # chat_template.jinja: the template chat_template: auto picks
)
TASK_VECTOR_TAGS = ("alloy", "task-vector", "compeft")


@dataclass(frozen=True)
class PublishResult:
    commit_sha: str
    url: str  # the commit page, or the pull request page when create_pr
    repo: str = ""
    revision: str = ""  # the branch pushed to, or refs/pr/N
    pr_url: str | None = None


class _Silent(tqdm):  # type: ignore[misc]
    """Download bars belong in a terminal, not in worker logs; the job row carries progress."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


class HubClient:
    """One caller's view of the Hub. ``token=None`` means anonymous: the service passes each caller's own token
    and never falls back to a token found in the worker's environment (that would lend the worker's access)."""

    def __init__(
        self,
        *,
        token: str | None = None,
        cache_dir: Path | None = None,
        endpoint: str | None = None,
        max_attempts: int = 4,
        backoff_s: float = 1.0,
        timeout_s: float = 10.0,
        disk_headroom_bytes: int = 0,
    ) -> None:
        self._token: str | bool = token or False
        self.cache_dir = Path(
            cache_dir or os.environ.get("ALLOY_HF_CACHE") or constants.HF_HUB_CACHE
        ).expanduser()
        # explicit endpoint beats HF_ENDPOINT, which huggingface_hub only reads at import time
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.disk_headroom_bytes = disk_headroom_bytes
        self._api = HfApi(endpoint=self.endpoint, token=self._token)

    def __repr__(self) -> str:  # never show the token
        return f"HubClient(endpoint={self.endpoint!r}, cache_dir={str(self.cache_dir)!r}, token={'***' if self._token else None})"

    # -- sources -------------------------------------------------------------------------------------------
    def resolve(self, source: HubSource) -> HubSource:
        """The same source with ``revision`` pinned to the commit sha it points at now."""
        info = self._retrying(
            lambda: self._api.model_info(source.repo, revision=source.revision, timeout=self.timeout_s),
            what=source.uri(),
            repo=source.repo,
            revision=source.revision,
        )
        if not info.sha or not _COMMIT_SHA.match(info.sha):
            raise HubError(f"the Hub did not return a commit sha for {source.uri()}", repo=source.repo)
        if source.subfolder:
            prefix = f"{source.subfolder.strip('/')}/"
            if not any(s.rfilename.startswith(prefix) for s in info.siblings or []):
                raise HubNotFoundError(
                    f"no folder {source.subfolder!r} in {source.repo}@{info.sha[:12]}",
                    repo=source.repo,
                    revision=info.sha,
                    subfolder=source.subfolder,
                )
        return source.model_copy(update={"revision": info.sha})

    def fetch(self, source: HubSource, *, allow_pickle: bool = False) -> Path:
        """A local folder holding only the files a merge needs, at a pinned commit (resolved first if needed)."""
        pinned = source if _COMMIT_SHA.match(source.revision) else self.resolve(source)
        sha, sub = pinned.revision, (pinned.subfolder or "").strip("/")
        snapshot = (
            self.cache_dir / repo_folder_name(repo_id=pinned.repo, repo_type="model") / "snapshots" / sha
        )
        folder = snapshot / sub if sub else snapshot
        manifest = self._manifest_path(pinned.repo, sha, sub, allow_pickle)
        if _complete(snapshot, manifest):
            return folder
        info = self._retrying(
            lambda: self._api.model_info(
                pinned.repo, revision=sha, files_metadata=True, timeout=self.timeout_s
            ),
            what=pinned.uri(),
            repo=pinned.repo,
            revision=sha,
        )
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        wanted = select_files(sizes, subfolder=sub, allow_pickle=allow_pickle, label=pinned.uri())
        self._check_disk_space(
            {f: sizes[f] for f in wanted if not (snapshot / f).is_file()}, label=pinned.uri()
        )
        for name in wanted:
            path = self._download(pinned.repo, name, sha)
            if (
                path != snapshot / name
            ):  # the cache layout is huggingface_hub's; fail loudly if it ever changes
                raise HubError(f"unexpected cache path {path} for {name}", repo=pinned.repo, file=name)
        # relative names only: the cache may be mounted at different paths in different workers
        _write_json_atomic(manifest, {"files": {f: sizes[f] for f in wanted}})
        logger.info("fetched %s (%d files) into %s", pinned.uri(), len(wanted), folder)
        return folder

    def pull_task_vector(self, source: HubSource) -> Path:
        """A compressed task vector (ComPEFT artifact) repo: its safetensors and manifest files."""
        return self.fetch(source)

    # -- destinations --------------------------------------------------------------------------------------
    def publish(
        self,
        folder: Path,
        target: HubOutput,
        *,
        base_model: list[str] | None = None,
        method: str | None = None,
        license: str | None = None,
        card_body: str | None = None,
        extra_tags: Iterable[str] = (),
    ) -> PublishResult:
        """Push a finished merge folder as one commit (shards, index, config, tokenizer files, model card).

        ``base_model`` lists Hub repo ids (the base first); the card's license defaults to the base's."""
        folder = Path(folder)
        files = check_publishable(folder)
        if license is None and base_model:
            license = self._license_of(base_model[0])
        metadata = front_matter(
            base_model=base_model or [], method=method, license=license, extra_tags=extra_tags
        )
        existing = (folder / "README.md").read_text() if (folder / "README.md").is_file() else None
        card = with_front_matter(metadata, existing=existing, body=card_body)
        files = [f for f in files if f != "README.md"]
        message = target.commit_message or f"Alloy merge{f' ({method})' if method else ''}"
        repo = target.repo

        self._retrying(
            lambda: self._api.create_repo(repo, private=target.private, exist_ok=True, repo_type="model"),
            what=f"create {repo}",
            repo=repo,
        )
        head = self._branch_head(repo, target.branch)

        # A unique id in the commit description lets a retry recognise its own commit when the first answer was
        # lost after the Hub applied it (the retry then sees the branch moved, by us).
        push_id = f"alloy-push-id: {uuid.uuid4().hex}"

        def commit() -> Any:
            operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
            return self._api.create_commit(
                repo,
                operations,
                commit_message=message,
                commit_description=push_id,
                revision=target.branch,
                create_pr=target.create_pr,
                parent_commit=head,
            )

        try:
            info = self._retrying(
                commit, what=f"push to {repo}@{target.branch}", repo=repo, branch=target.branch
            )
        except HubConflictError:
            landed = self._find_commit(repo, target.branch, push_id, since=head)
            if landed is None:
                raise
            logger.info("push to %s@%s had landed before its reply was lost: %s", repo, target.branch, landed)
            return PublishResult(
                commit_sha=landed,
                url=f"{self.endpoint}/{repo}/commit/{landed}",
                repo=repo,
                revision=target.branch,
            )
        revision = target.branch
        if info.pr_url:
            revision = f"refs/pr/{info.pr_url.rstrip('/').rsplit('/', 1)[-1]}"
        logger.info("pushed %d files to %s@%s as %s", len(files) + 1, repo, revision, info.oid)
        return PublishResult(
            commit_sha=info.oid,
            url=info.pr_url or info.commit_url,
            repo=repo,
            revision=revision,
            pr_url=info.pr_url,
        )

    def push_task_vector(
        self, folder: Path, target: HubOutput, *, base_model: str, method: str = "compeft"
    ) -> PublishResult:
        """Push a compressed task vector (ComPEFT artifact folder) as its own repo."""
        return self.publish(
            folder, target, base_model=[base_model], method=method, extra_tags=TASK_VECTOR_TAGS
        )

    # -- internals -----------------------------------------------------------------------------------------
    def _branch_head(self, repo: str, branch: str) -> str:
        """The current head of ``branch`` (created from main when missing): the push's parent commit."""
        try:
            return self._head_of(repo, branch)
        except HubNotFoundError as exc:
            if exc.context.get("missing") != "revision":
                raise
        self._retrying(
            lambda: self._api.create_branch(repo, branch=branch, exist_ok=True),
            what=f"create branch {branch} in {repo}",
            repo=repo,
        )
        return self._head_of(repo, branch)

    def _find_commit(self, repo: str, branch: str, marker: str, *, since: str) -> str | None:
        """The sha of the commit on ``branch`` after ``since`` whose description is ``marker``, if any."""
        commits = self._retrying(
            lambda: self._api.list_repo_commits(repo, revision=branch),
            what=f"commits of {repo}@{branch}",
            repo=repo,
            revision=branch,
        )
        for commit in commits:
            if commit.commit_id == since:
                return None
            if commit.message.strip() == marker:
                return commit.commit_id
        return None

    def _head_of(self, repo: str, revision: str) -> str:
        sha = self._retrying(
            lambda: self._api.repo_info(repo, revision=revision, timeout=self.timeout_s).sha,
            what=f"{repo}@{revision}",
            repo=repo,
            revision=revision,
        )
        if not sha:
            raise HubError(f"the Hub did not return a commit sha for {repo}@{revision}", repo=repo)
        return sha

    def _license_of(self, repo: str) -> str | None:
        """The base's license from its card, when the Hub knows it (best effort: a card is never worth a failure)."""
        try:
            info = self._api.model_info(repo, timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure here just leaves the license out
            logger.info("no license for %s from the Hub (%s)", repo, type(exc).__name__)
            return None
        license_ = getattr(info.card_data, "license", None) if info.card_data else None
        return license_ if isinstance(license_, str) else None

    def _download(self, repo: str, filename: str, sha: str) -> Path:
        return Path(
            self._retrying(
                lambda: hf_hub_download(
                    repo,
                    filename,
                    revision=sha,
                    cache_dir=self.cache_dir,
                    token=self._token,
                    endpoint=self.endpoint,
                    etag_timeout=self.timeout_s,
                    tqdm_class=_Silent,
                ),
                what=f"{repo}/{filename}@{sha[:12]}",
                repo=repo,
                revision=sha,
                file=filename,
            )
        )

    def _manifest_path(self, repo: str, sha: str, subfolder: str, allow_pickle: bool) -> Path:
        key = hashlib.sha256(f"{subfolder}|{allow_pickle}".encode()).hexdigest()[:16]
        return self.cache_dir / ".alloy-manifests" / f"{repo.replace('/', '--')}--{sha}--{key}.json"

    def _check_disk_space(self, missing: dict[str, int], *, label: str) -> None:
        needed = sum(missing.values())
        if not needed:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache_dir).free
        if needed + self.disk_headroom_bytes > free:
            raise OutputError(
                f"not enough disk space in the Hub cache for {label}: {needed} bytes to download"
                f" (+{self.disk_headroom_bytes} headroom), {free} free",
                needed_bytes=needed,
                free_bytes=free,
                cache_dir=str(self.cache_dir),
            )

    def _retrying(self, call: Callable[[], T], *, what: str, **context: Any) -> T:
        """Run ``call``; transient failures retry with exponential backoff, everything else fails at once."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - classified below; unknown errors re-raise unchanged
                error = map_hub_error(exc, what=what, **context)
                if error is None:
                    raise
                if not error.transient:
                    raise error from exc
                if attempt == self.max_attempts:
                    raise HubTransientError(
                        f"{error.detail} (gave up after {attempt} attempts)",
                        **{**error.context, "attempts": attempt},
                    ) from exc
                delay = min(self.backoff_s * 2 ** (attempt - 1), 30.0) * random.uniform(0.5, 1.0)
                logger.warning(
                    "%s failed (%s); retry %d/%d in %.1fs",
                    what,
                    error.detail,
                    attempt,
                    self.max_attempts - 1,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


def publish_merge(client: HubClient, folder: Path, recipe: Recipe) -> PublishResult:
    """The one publish of a finished merge, for the CLI and the worker alike: to ``recipe.output.hub``, with the
    recipe's Hub lineage (base first) on the card and its method in the tags and the commit message."""
    if recipe.output.hub is None:
        raise ValueError("publish_merge needs a recipe with output.hub")
    return client.publish(folder, recipe.output.hub, base_model=recipe.hub_lineage(), method=recipe.method)


def map_hub_error(exc: BaseException, *, what: str, **context: Any) -> HubError | None:
    """The Alloy error for a huggingface_hub / network error (looking through wrapped causes), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        mapped = _map_one(current, what=what, context=context)
        if mapped is not None:
            return mapped
        current = current.__cause__ or current.__context__
    if isinstance(exc, LocalEntryNotFoundError):  # hf_hub_download's "could not reach the Hub" with no cause
        return HubTransientError(
            f"could not reach the Hub for {what}; check the server's network access to the Hub, "
            "or use a local path",
            **context,
        )
    return None


def _map_one(exc: BaseException, *, what: str, context: dict[str, Any]) -> HubError | None:
    status = _status_of(exc)
    ctx = {**context, **({"status": status} if status else {})}
    if isinstance(exc, GatedRepoError):
        return HubAccessError(
            f"{what}: gated repo; request access on the Hub and use a token that has it", **ctx
        )
    if isinstance(exc, RepositoryNotFoundError):
        if (
            status == 401
        ):  # the Hub answers 401 for both missing and private repos when the token can't see them
            return HubAccessError(
                f"{what}: repository not found, or private and the token (if any) has no access", **ctx
            )
        return HubNotFoundError(f"{what}: repository not found", **ctx, missing="repo")
    if isinstance(exc, RevisionNotFoundError):
        return HubNotFoundError(f"{what}: revision not found", **ctx, missing="revision")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubNotFoundError(f"{what}: file not found", **ctx, missing="file")
    if isinstance(exc, HfHubHTTPError) and status is not None:
        if status in (401, 403):
            return HubAccessError(f"{what}: access denied ({status})", **ctx)
        if status == 404:
            return HubNotFoundError(f"{what}: not found", **ctx)
        if status in (409, 412):
            return HubConflictError(
                f"{what}: the branch moved while pushing (another push landed first)", **ctx
            )
        if status in _TRANSIENT_STATUS:
            return HubTransientError(f"{what}: Hub error {status}", **ctx)
        return HubError(f"{what}: Hub refused the request ({status}): {_server_message(exc)}", **ctx)
    if isinstance(exc, _NETWORK_ERRORS):
        # the library's text ("ConnectError: [Errno -2] Name or service not known", env-var hints meant for
        # a developer's shell) tells a user nothing they can act on: say what failed and what to do
        return HubTransientError(
            f"{what}: could not reach the Hub ({_network_failure(exc)}); Alloy retries transient failures, "
            "so if this persists check the server's network access to the Hub, or use a local path",
            **context,
        )
    return None


def _network_failure(exc: BaseException) -> str:
    if type(exc).__name__ == "OfflineModeIsEnabled":
        return "the server is configured for offline mode"
    if isinstance(exc, _httpx.TimeoutException | TimeoutError):
        return "timed out"
    if isinstance(exc, _httpx.RemoteProtocolError):
        return "the connection was dropped"
    return "connection failed"


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _server_message(exc: BaseException) -> str:
    return getattr(exc, "server_message", None) or str(exc).splitlines()[0]


# -- file selection and checks -------------------------------------------------------------------------------
def select_files(
    files: dict[str, int] | Iterable[str], *, subfolder: str = "", allow_pickle: bool = False, label: str = ""
) -> list[str]:
    """The repo paths a merge needs, directly under ``subfolder``: safetensors weights (or, with
    ``allow_pickle``, pickle weights when there is no safetensors) plus side files. Sorted, for stable order."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    local = {f[len(prefix) :]: f for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]}

    def matching(patterns: tuple[str, ...]) -> list[str]:
        return [full for name, full in local.items() if any(fnmatch.fnmatch(name, p) for p in patterns)]

    weights = matching(SAFETENSORS_PATTERNS)
    if not weights:
        pickles = matching(PICKLE_PATTERNS)
        if pickles and not allow_pickle:
            raise UnsafeCheckpointError(
                f"{label} has only pickle weights ({', '.join(sorted(pickles))}); pickle files can run code when"
                " loaded. Use a safetensors revision, or set allow_pickle: true in the recipe",
                source=label,
                files=sorted(pickles),
            )
        if not pickles:
            raise SourceNotFoundError(
                f"{label} has no model weights (no *.safetensors or pickle files)", source=label
            )
        weights = pickles
    return sorted(set(weights) | set(matching(SIDE_FILE_PATTERNS)))


def check_publishable(folder: Path) -> list[str]:
    """Every file to push (posix paths), after checking the folder is a complete merge: weights present and
    every shard the index names on disk. A half-written folder must never reach the Hub."""
    if not folder.is_dir():
        raise OutputError(f"nothing to push: {folder} is not a folder", path=str(folder))
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not any(f.endswith(".safetensors") for f in files):
        raise OutputError(f"refusing to push {folder}: it holds no safetensors weights", path=str(folder))
    for index in (f for f in files if f.endswith(".safetensors.index.json")):
        try:
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise OutputError(
                f"refusing to push {folder}: unreadable {index} ({exc})", path=str(folder)
            ) from None
        base = PurePosixPath(index).parent
        missing = sorted(s for s in shards if (base / s).as_posix() not in files)
        if missing:
            raise OutputError(
                f"refusing to push {folder}: shards named by {index} are missing: {missing}",
                path=str(folder),
                missing=missing,
            )
    return files


def _complete(snapshot: Path, manifest: Path) -> bool:
    """Whether an earlier fetch completed and every file it listed is still in the snapshot, with its size."""
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, size in files.items():
        path = snapshot / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
