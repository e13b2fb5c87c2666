"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only, loopback only).

It implements the endpoints the real ``huggingface_hub`` client calls for what Alloy does — repo/model info,
model search (``list_models``), file resolve (HEAD/GET with ETag, X-Repo-Commit, Content-Length, ranged reads), create_repo, create_branch, refs,
validate-yaml, preupload, NDJSON commits (with ``parentCommit`` checks and ``create_pr``) and the LFS batch API
with the basic transfer — so tests drive the real client with ``endpoint=server.url`` instead of patching it.

Blobs live on disk under ``root`` (addressed by sha256); commits are 40-hex SHA-1s of their content, kept in
memory. Access follows the Hub: private repos answer 401 without a token and 404 to a token without access;
gated repos answer 401/403 with ``X-Error-Code: GatedRepo``. Faults (status codes, delays, dropped or truncated
connections) are injected per method and path substring so retry and error paths can be tested.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

#: Tokens the ``hub_server`` fixture registers: WRITE_TOKEN writes (and reads) the ``alloy`` namespace,
#: READ_TOKEN is a valid token with access to nothing private.
WRITE_TOKEN = "hf_alloy_write_token"
READ_TOKEN = "hf_alloy_read_token"
_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), h)
    for m, p, h in [
        ("GET", r"^/api/models$", "_list_models"),
        ("GET", rf"^/api/models/{_REPO}(/revision/(?P<rev>[^/]+))?$", "_model_info"),
        ("GET", rf"^/api/models/{_REPO}/refs$", "_refs"),
        ("GET", rf"^/api/models/{_REPO}/commits/(?P<rev>[^/]+)$", "_list_commits"),
        ("POST", r"^/api/repos/create$", "_create_repo"),
        ("POST", r"^/api/validate-yaml$", "_validate_yaml"),
        ("POST", rf"^/api/models/{_REPO}/branch/(?P<branch>.+)$", "_create_branch"),
        ("POST", rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$", "_preupload"),
        ("POST", rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$", "_commit"),
        ("POST", rf"^/{_REPO}\.git/info/lfs/objects/batch$", "_lfs_batch"),
        ("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$", "_lfs_upload"),
        ("HEAD", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "_resolve"),
        ("GET", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "_resolve"),
    ]
]


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    size: int
    git_oid: str  # the git blob SHA-1: the ETag of a regular file
    lfs: bool


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]
    description: str = ""


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: list[str] = field(default_factory=list)  # refs/pr/N is pull_requests[N - 1]


@dataclass
class Fault:
    """Answer the next ``times`` matching requests with a fault instead of the real reply.

    kind: ``status`` (reply ``status``), ``delay`` (sleep ``delay_s`` then reply normally), ``drop`` (close the
    connection without a reply), ``truncate`` (send headers and ``after_bytes`` of the body, then close),
    ``hook`` (call ``hook()`` — e.g. land a concurrent commit — then reply normally), ``lose_reply`` (do the
    work, then close the connection instead of replying: a commit that landed but whose answer was lost).
    """

    method: str
    path_contains: str
    kind: str
    status: int = 500
    delay_s: float = 0.0
    after_bytes: int = 0
    hook: Callable[[], Any] | None = None
    times: int | None = 1  # None: forever
    hits: int = 0


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int
    authorization: bool


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})
        self.extra = dict(extra or {})


class HubServer:
    """Start with :meth:`start` (binds 127.0.0.1 on a free port), stop with :meth:`stop`."""

    def __init__(self, root: Path, *, lfs_threshold: int | None = None) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        #: Files of at least this many bytes go through LFS; None: every file is sent inline (regular).
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.commits: dict[str, Commit] = {}
        self.tokens: dict[
            str, tuple[set[str], set[str]]
        ] = {}  # token -> (readable, writable) namespaces/repos
        self.faults: list[Fault] = []
        self.log: list[LoggedRequest] = []
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- test setup helpers (direct, not over HTTP) ------------------------------------------------------
    def add_token(self, token: str, *, read: Iterable[str] = (), write: Iterable[str] = ()) -> None:
        """A token that reads ``read`` and reads+writes ``write`` (each a namespace or a repo id)."""
        self.tokens[token] = (set(read) | set(write), set(write))

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> str:
        """Create a repo with the Hub's initial commit (a .gitattributes); returns that commit's sha."""
        with self.lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} exists")
            repo = Repo(repo_id, private=private, gated=gated)
            self.repos[repo_id] = repo
            attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
            files = {".gitattributes": self._store_blob(attributes, lfs=False)}
            sha = self._new_commit(None, "initial commit", files)
            repo.branches["main"] = sha
            return sha

    def upload(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        *,
        branch: str = "main",
        message: str = "upload",
    ) -> str:
        """Commit ``files`` (path in repo -> bytes or a local file) on ``branch``; returns the commit sha."""
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch) or repo.branches["main"]
            tree = dict(self.commits[parent].files)
            for path, content in files.items():
                data = content.read_bytes() if isinstance(content, Path) else content
                tree[path] = self._store_blob(data, lfs=self._is_lfs(len(data)))
            sha = self._new_commit(parent, message, tree)
            repo.branches[branch] = sha
            return sha

    def upload_folder(
        self, repo_id: str, folder: Path, *, path_in_repo: str = "", branch: str = "main"
    ) -> str:
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        files = {
            prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        return self.upload(repo_id, files, branch=branch)

    def create_tag(self, repo_id: str, tag: str, *, revision: str = "main") -> str:
        with self.lock:
            repo = self.repos[repo_id]
            sha = self._resolve_revision(repo, revision)
            repo.tags[tag] = sha
            return sha

    def head(self, repo_id: str, revision: str = "main") -> str:
        with self.lock:
            return self._resolve_revision(self.repos[repo_id], revision)

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        with self.lock:
            return dict(self.commits[self.head(repo_id, revision)].files)

    def read(self, repo_id: str, path: str, *, revision: str = "main") -> bytes:
        return self._blob_path(self.files_at(repo_id, revision)[path].sha256).read_bytes()

    def inject(self, method: str, path_contains: str, kind: str = "status", **options: Any) -> Fault:
        fault = Fault(method=method.upper(), path_contains=path_contains, kind=kind, **options)
        with self.lock:
            self.faults.append(fault)
        return fault

    def requests(self, *, method: str | None = None, path_contains: str = "") -> list[LoggedRequest]:
        with self.lock:
            return [r for r in self.log if (method is None or r.method == method) and path_contains in r.path]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()

    # -- storage -----------------------------------------------------------------------------------------
    def _is_lfs(self, size: int) -> bool:
        return self.lfs_threshold is not None and size >= self.lfs_threshold

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _store_blob(self, data: bytes, *, lfs: bool) -> StoredFile:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self._blob_path(sha256)
        if not target.exists():
            tmp = target.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return StoredFile(sha256=sha256, size=len(data), git_oid=git_oid, lfs=lfs)

    def _new_commit(
        self, parent: str | None, message: str, files: dict[str, StoredFile], description: str = ""
    ) -> str:
        tree = {path: f.sha256 for path, f in sorted(files.items())}
        body = json.dumps(
            {"parent": parent, "message": message, "tree": tree, "t": time.time_ns()}, sort_keys=True
        )
        sha = hashlib.sha1(body.encode()).hexdigest()
        self.commits[sha] = Commit(
            sha=sha, parent=parent, message=message, files=files, description=description
        )
        return sha

    def _resolve_revision(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if match := re.fullmatch(r"refs/pr/(\d+)", revision):
            number = int(match[1])
            if 1 <= number <= len(repo.pull_requests):
                return repo.pull_requests[number - 1]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in self.commits:
            return revision
        raise _HTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    # -- access ------------------------------------------------------------------------------------------
    def _token_of(self, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("Authorization") or ""
        if not auth.lower().startswith("bearer "):
            return None
        token = auth[7:].strip()
        if token not in self.tokens:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        return token

    def _grants(self, token: str | None, repo_id: str, *, write: bool) -> bool:
        if token is None:
            return False
        readable, writable = self.tokens[token]
        allowed = writable if write else readable
        return repo_id in allowed or repo_id.split("/")[0] in allowed

    def _readable_repo(self, repo_id: str, headers: Mapping[str, str]) -> Repo:
        token = self._token_of(headers)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._grants(token, repo_id, write=False)):
            # like the Hub: 401 when anonymous (missing and private look the same), 404 otherwise
            raise _HTTPError(401 if token is None else 404, "Repository not found", code="RepoNotFound")
        if repo.gated and not self._grants(token, repo_id, write=False):
            raise _HTTPError(
                401 if token is None else 403, f"Access to model {repo_id} is restricted.", code="GatedRepo"
            )
        return repo

    def _writable_repo(self, repo_id: str, headers: Mapping[str, str]) -> Repo:
        repo = self._readable_repo(repo_id, headers)
        if not self._grants(self._token_of(headers), repo_id, write=True):
            raise _HTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that timed out or was cut off by an injected fault is expected here, not a server bug
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, like the client expects; every reply sets Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the hub keeps its own log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing ----------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, self.query = split.path, parse_qs(split.query)
        body = self._read_body()
        fault = self._take_fault(method, path)
        self._truncate_after: int | None = None
        self._lose_reply = False
        if fault is not None:
            if fault.kind == "drop":
                self._record(method, path, 0)
                self.close_connection = True
                return
            if fault.kind == "status":
                self._send_json(fault.status, {"error": "injected fault"}, method=method)
                return
            if fault.kind == "delay":
                time.sleep(fault.delay_s)
            if fault.kind == "hook" and fault.hook is not None:
                fault.hook()
            if fault.kind == "truncate":
                self._truncate_after = fault.after_bytes
            self._lose_reply = fault.kind == "lose_reply"
        for route_method, pattern, handler in _ROUTES:
            match = pattern.match(path) if route_method == method else None
            if match:
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                try:
                    getattr(self, handler)(method, body=body, **params)
                except _HTTPError as exc:
                    headers = dict(exc.headers)
                    if exc.code:
                        headers["X-Error-Code"] = exc.code
                    headers["X-Error-Message"] = exc.message
                    self._send_json(
                        exc.status, {"error": exc.message, **exc.extra}, headers=headers, method=method
                    )
                return
        self._send_json(404, {"error": f"no route for {method} {path}"})

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.hub.lock:
            for fault in self.hub.faults:
                if fault.method in (method, "*") and fault.path_contains in path:
                    if fault.times is not None and fault.hits >= fault.times:
                        continue
                    fault.hits += 1
                    return fault
        return None

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _record(self, method: str, path: str, status: int) -> None:
        with self.hub.lock:
            self.hub.log.append(LoggedRequest(method, path, status, "Authorization" in self.headers))

    def _send(
        self,
        status: int,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        method: str = "GET",
        content_length: int | None = None,
    ) -> None:
        method = self.command  # HEAD replies carry headers only
        self._record(method, urlsplit(self.path).path, status)
        if self._lose_reply:
            self.close_connection = True
            return
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if content_length is None else content_length))
        self.end_headers()
        if method == "HEAD":
            return
        if self._truncate_after is not None:  # a connection that dies mid-body
            self.wfile.write(data[: self._truncate_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def _send_json(
        self, status: int, payload: Any, *, headers: Mapping[str, str] | None = None, method: str = "GET"
    ) -> None:
        data = json.dumps(payload).encode()
        self._send(
            status, data, headers={"Content-Type": "application/json", **(headers or {})}, method=method
        )

    @property
    def _base(self) -> str:
        return self.hub.url

    # -- read endpoints ----------------------------------------------------------------------------------
    def _model_info(self, method: str, *, body: bytes, repo: str, rev: str = "main") -> None:
        hub = self.hub
        with hub.lock:
            record = hub._readable_repo(repo, self.headers)
            sha = hub._resolve_revision(record, rev)
            files = hub.commits[sha].files
        with_blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, f in sorted(files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "id": repo,
            "modelId": repo,
            "sha": sha,
            "private": record.private,
            "gated": "auto" if record.gated else False,
            "siblings": siblings,
            "tags": [],
        }
        if "README.md" in files:
            card = hub._blob_path(files["README.md"].sha256).read_text()
            if match := re.match(r"^---\n(.*?)\n---", card, flags=re.DOTALL):
                info["cardData"] = yaml.safe_load(match[1]) or {}
        info.update(self._config_and_safetensors(files))
        self._send_json(200, info)

    def _config_and_safetensors(self, files: Mapping[str, StoredFile]) -> dict[str, Any]:
        """What the Hub derives from a repo's files: ``config`` (architectures, model_type of config.json) and
        ``safetensors`` (parameters per dtype and their total, from the safetensors headers)."""
        out: dict[str, Any] = {}
        if "config.json" in files:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                config = json.loads(self.hub._blob_path(files["config.json"].sha256).read_text())
                if isinstance(config, dict):
                    out["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        per_dtype: dict[str, int] = {}
        for path, f in files.items():
            if path.endswith(".safetensors"):
                raw = self.hub._blob_path(f.sha256).read_bytes()
                header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
                for name, entry in header.items():
                    if name != "__metadata__":
                        count = 1
                        for dim in entry["shape"]:
                            count *= int(dim)
                        per_dtype[entry["dtype"]] = per_dtype.get(entry["dtype"], 0) + count
        if per_dtype:
            out["safetensors"] = {"parameters": per_dtype, "total": sum(per_dtype.values())}
        return out

    def _list_models(self, method: str, *, body: bytes) -> None:
        """``/api/models?search=...&limit=N``: the repos whose id contains ``search`` (case-insensitive) that
        the caller may read (public ones, and private ones its token grants), by id."""
        hub = self.hub
        search = self.query.get("search", [""])[0].lower()
        limit = int(self.query.get("limit", ["1000"])[0])
        with hub.lock:
            token = hub._token_of(self.headers)
            found = [
                {
                    "id": r.repo_id,
                    "modelId": r.repo_id,
                    "private": r.private,
                    "gated": "auto" if r.gated else False,
                }
                for r in sorted(hub.repos.values(), key=lambda r: r.repo_id)
                if search in r.repo_id.lower()
                and (not r.private or hub._grants(token, r.repo_id, write=False))
            ]
        self._send_json(200, found[:limit])

    def _refs(self, method: str, *, body: bytes, repo: str) -> None:
        with self.hub.lock:
            record = self.hub._readable_repo(repo, self.headers)
            refs = {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                    for n, s in record.branches.items()
                ],
                "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in record.tags.items()
                ],
                "converts": [],
            }
            if self.query.get("include_prs"):
                refs["pullRequests"] = [
                    {"name": f"refs/pr/{i}", "ref": f"refs/pr/{i}", "targetCommit": s}
                    for i, s in enumerate(record.pull_requests, start=1)
                ]
        self._send_json(200, refs)

    def _list_commits(self, method: str, *, body: bytes, repo: str, rev: str) -> None:
        hub = self.hub
        with hub.lock:
            sha: str | None = hub._resolve_revision(hub._readable_repo(repo, self.headers), rev)
            items = []
            while sha is not None:
                commit = hub.commits[sha]
                items.append(
                    {
                        "id": sha,
                        "title": commit.message,
                        "message": commit.description,
                        "authors": [{"user": "alloy"}],
                        "date": "2026-01-01T00:00:00.000Z",
                    }
                )
                sha = commit.parent
        self._send_json(200, items)

    def _resolve(self, method: str, *, body: bytes, repo: str, rev: str, path: str) -> None:
        hub = self.hub
        with hub.lock:
            record = hub._readable_repo(repo, self.headers)
            sha = hub._resolve_revision(record, rev)
            stored = hub.commits[sha].files.get(path)
        if stored is None:
            raise _HTTPError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": sha})
        etag = stored.sha256 if stored.lfs else stored.git_oid
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})
        blob = hub._blob_path(stored.sha256)
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if method == "HEAD":
            self._send(200, b"", headers=headers, method="HEAD", content_length=stored.size)
        elif ranged:
            start = int(ranged[1])
            end = int(ranged[2]) if ranged[2] else stored.size - 1
            if start >= stored.size:
                raise _HTTPError(
                    416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{stored.size}"}
                )
            with blob.open("rb") as handle:
                handle.seek(start)
                data = handle.read(end - start + 1)
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{stored.size}"
            self._send(206, data, headers=headers)
        else:
            self._send(200, blob.read_bytes(), headers=headers)

    # -- write endpoints ---------------------------------------------------------------------------------
    def _create_repo(self, method: str, *, body: bytes) -> None:
        hub = self.hub
        payload = json.loads(body or b"{}")
        token = hub._token_of(self.headers)
        if token is None:
            raise _HTTPError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or sorted(hub.tokens[token][1] or {"anonymous"})[0]
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise _HTTPError(400, "only model repos are served here")
        if not hub._grants(token, repo_id, write=True):
            raise _HTTPError(
                403, f"You don't have the rights to create a model under the namespace {namespace}"
            )
        with hub.lock:
            if repo_id in hub.repos:
                raise _HTTPError(
                    409, "You already created this model repo", extra={"url": f"{self._base}/{repo_id}"}
                )
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            hub.create_repo(repo_id, private=private)
        self._send_json(200, {"url": f"{self._base}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, method: str, *, body: bytes) -> None:
        content = json.loads(body).get("content", "")
        errors = []
        if match := re.match(r"^---\n(.*?)\n---", content, flags=re.DOTALL):
            try:
                meta = yaml.safe_load(match[1]) or {}
            except yaml.YAMLError as exc:
                meta, errors = {}, [{"message": f"invalid YAML: {exc}"}]
            if not isinstance(meta, dict):
                errors.append({"message": "metadata must be a mapping"})
            else:
                for key in ("base_model", "tags"):
                    value = meta.get(key)
                    if value is not None and not (
                        isinstance(value, str)
                        or (isinstance(value, list) and all(isinstance(v, str) for v in value))
                    ):
                        errors.append({"message": f'"{key}" must be a string or an array of strings'})
        if errors:
            self._send_json(400, {"errors": errors}, headers={"X-Error-Message": errors[0]["message"]})
        else:
            self._send_json(200, {"errors": [], "warnings": []})

    def _create_branch(self, method: str, *, body: bytes, repo: str, branch: str) -> None:
        hub = self.hub
        payload = json.loads(body or b"{}")
        with hub.lock:
            record = hub._writable_repo(repo, self.headers)
            if branch in record.branches:
                raise _HTTPError(409, f"Reference already exists: refs/heads/{branch}")
            record.branches[branch] = hub._resolve_revision(record, payload.get("startingPoint") or "main")
        self._send_json(200, {})

    def _preupload(self, method: str, *, body: bytes, repo: str, rev: str) -> None:
        hub = self.hub
        with hub.lock:
            hub._writable_repo(repo, self.headers)
        files = json.loads(body)["files"]
        self._send_json(
            200,
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if hub._is_lfs(int(f["size"])) else "regular",
                        "shouldIgnore": False,
                    }
                    for f in files
                ]
            },
        )

    def _lfs_batch(self, method: str, *, body: bytes, repo: str) -> None:
        hub = self.hub
        with hub.lock:
            hub._writable_repo(repo, self.headers)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise _HTTPError(400, "only basic uploads are supported")
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not hub._blob_path(obj["oid"]).exists():
                entry["actions"] = {"upload": {"href": f"{self._base}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send_json(
            200,
            {"transfer": "basic", "objects": objects},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_upload(self, method: str, *, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HTTPError(400, "uploaded content does not match its oid")
        with self.hub.lock:
            self.hub._store_blob(body, lfs=True)
        self._send(200, b"")

    def _commit(self, method: str, *, body: bytes, repo: str, rev: str) -> None:
        hub = self.hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        create_pr = self.query.get("create_pr", ["0"])[0] in ("1", "true")
        with hub.lock:
            record = hub._writable_repo(repo, self.headers)
            if rev not in record.branches and not rev.startswith("refs/pr/"):
                raise _HTTPError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
            head = hub._resolve_revision(record, rev)
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != head:
                # the Hub's answer to a stale parent: nothing is written
                raise _HTTPError(412, f"A commit has happened since. Please refresh and try again. ({head})")
            tree = dict(hub.commits[head].files)
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _HTTPError(400, "only base64 files are supported")
                    data = base64.b64decode(value["content"])
                    tree[value["path"]] = hub._store_blob(data, lfs=False)
                elif key == "lfsFile":
                    blob = hub._blob_path(value["oid"])
                    if not blob.exists() or blob.stat().st_size != value["size"]:
                        raise _HTTPError(422, f"LFS object {value['oid']} was not uploaded")
                    tree[value["path"]] = StoredFile(value["oid"], value["size"], _git_oid_of(blob), lfs=True)
                elif key == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        raise _HTTPError(404, "A file with this name doesn't exist", code="EntryNotFound")
                elif key != "header":
                    raise _HTTPError(400, f"unsupported commit operation {key!r}")
            sha = hub._new_commit(head, header.get("summary") or "", tree, header.get("description") or "")
            pr_url = None
            if create_pr:
                record.pull_requests.append(sha)
                pr_url = f"{self._base}/{repo}/discussions/{len(record.pull_requests)}"
            elif rev.startswith("refs/pr/"):
                record.pull_requests[int(rev.rsplit("/", 1)[1]) - 1] = sha
            else:
                record.branches[rev] = sha
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._base}/{repo}/commit/{sha}",
                "pullRequestUrl": pr_url,
                "commitMessage": header.get("summary"),
            },
        )


def _git_oid_of(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
