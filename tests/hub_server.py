"""A small, real HTTP server speaking the subset of the Hugging Face Hub protocol used by ``huggingface_hub`` 2.4.

Tests use it to push to and load from "the Hub" over 127.0.0.1 without mocking ``huggingface_hub``:

    with LocalHub() as hub, use_local_hub(hub, tmp_path / "cache"):
        model.push_to_hub("user/tiny")                       # real HfApi calls, in this process
        AutoModelForCausalLM.from_pretrained("user/tiny")

    env = hub_env(hub, tmp_path / "home")                    # or: a subprocess pointed at the same hub
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env})

Repos live in memory (content-addressed blobs plus a commit graph per repo), so every commit gets a new sha
and files can be added, replaced or deleted. Everything is "regular" git content: the server never asks for
LFS or Xet uploads and never advertises Xet for downloads, so only plain HTTP is involved.

Only the standard library is used on the server side.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


USER = "user"  # the account every token maps to
DUMMY_TOKEN = "hf_local_hub_dummy_token"
REPO_TYPES = ("model", "dataset", "space")
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob: what the Hub reports as ``oid``/``ETag`` for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # noqa: UP017  (datetime.UTC is 3.11+; setup.cfg allows 3.10)


@dataclass
class Commit:
    """One commit of a repo: a full snapshot ``path -> blob oid`` plus metadata."""

    oid: str
    title: str
    message: str
    parent: str | None
    tree: dict[str, str]
    date: str


@dataclass
class Repo:
    """A repo: branches pointing at commits, and the commits themselves (chronological)."""

    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)


class HubError(Exception):
    """Raised inside handlers; turned into an HTTP error with the Hub's ``X-Error-Code`` header."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


class LocalHub:
    """A Hub served over HTTP on 127.0.0.1 (a random free port by default).

    Args:
        storage_dir: where file contents are kept (``blobs/<git oid>``) along with ``state.json``, a readable dump
            of repos, branches and commits rewritten after every change; ``None`` keeps everything in memory.
        host, port: where to listen; port 0 picks a free port.

    Attributes tests may use:
        endpoint: ``"http://127.0.0.1:PORT"``, set by :meth:`start`.
        requests: list of ``(method, path)`` received (path without query string, URL-decoded).
        fail_commits: when true, ``POST /api/{type}s/{id}/commit/{rev}`` answers 500.
        failures: list of ``(method, path_regex, status)`` rules; a matching request answers ``status``.
    """

    def __init__(self, storage_dir: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self._host, self._port = host, port
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        if self.storage_dir is not None:
            (self.storage_dir / "blobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}  # only used without storage_dir
        self._sizes: dict[str, int] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        self.endpoint = ""
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = False
        self.failures: list[tuple[str, str, int]] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalHub:
        """Start serving in a daemon thread; returns ``self``."""
        hub = self

        class Handler(_HubHandler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://{self._host}:{self._server.server_address[1]}"
        # a short poll interval keeps stop() (and so each test teardown) fast
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers
    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Content of every file of ``repo_id`` at ``revision`` (branch name or commit sha)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            commit = self._resolve(repo, revision)
            return {path: self._blob(oid) for path, oid in commit.tree.items()}

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """All commits of ``repo_id`` in chronological order (``[0]`` is the initial commit, ``[-1]`` the latest)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return [repo.commits[oid] for oid in repo.history]

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def requested(self, method: str, pattern: str) -> list[str]:
        """Paths of received requests with this method whose path matches the regex ``pattern``."""
        return [p for m, p in list(self.requests) if m == method and re.search(pattern, p)]

    # ------------------------------------------------------------------ storage internals
    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        # a branch name, or a (possibly abbreviated) commit sha, as the Hub accepts both
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(self, repo: Repo, branch: str, title: str, message: str, tree: dict[str, str]) -> Commit:
        parent = repo.branches.get(branch)
        self._counter += 1
        # the counter makes two commits with identical content still get distinct shas, as in git (timestamps)
        seed = json.dumps([repo.repo_id, parent, title, sorted(tree.items()), self._counter]).encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), title, message, parent, dict(tree), _now_iso())
        repo.commits[commit.oid] = commit
        repo.history.append(commit.oid)
        repo.branches[branch] = commit.oid
        self._save_state()
        return commit

    def _store(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        if self.storage_dir is None:
            self._blobs[oid] = data
        elif oid not in self._sizes:
            (self.storage_dir / "blobs" / oid).write_bytes(data)
        self._sizes[oid] = len(data)
        return oid

    def _blob(self, oid: str) -> bytes:
        if self.storage_dir is None:
            return self._blobs[oid]
        return (self.storage_dir / "blobs" / oid).read_bytes()

    def _save_state(self) -> None:
        """Dump repos/branches/commits to ``storage_dir/state.json`` (for people debugging a test)."""
        if self.storage_dir is None:
            return
        state = {
            f"{repo_type}s/{repo_id}": {
                "private": repo.private,
                "branches": repo.branches,
                "commits": [vars(repo.commits[oid]) for oid in repo.history],
            }
            for (repo_type, repo_id), repo in self._repos.items()
        }
        (self.storage_dir / "state.json").write_text(json.dumps(state, indent=1))

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, repo_type, private, _now_iso())
        self._repos[(repo_type, repo_id)] = repo
        # the Hub creates every repo with an initial commit holding .gitattributes
        self._new_commit(repo, "main", "initial commit", "", {".gitattributes": self._store(_GITATTRIBUTES)})
        return repo

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.endpoint}/{prefix}{repo_id}"


# ---------------------------------------------------------------------- HTTP layer
_REPO_API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _HubHandler(BaseHTTPRequestHandler):
    """Routes requests to the handlers below; one instance per request (stdlib design)."""

    hub: LocalHub  # set on a per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx clients expect

    def log_message(self, format, *args):  # noqa: A002
        pass  # keep test output clean

    # --- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self):
        hub = self.hub
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        body = self._body()  # always drain the body so keep-alive connections stay in sync
        with hub._lock:
            hub.requests.append((self.command, path))
        try:
            for method, pattern, status in list(hub.failures):
                if method == self.command and re.search(pattern, path):
                    raise HubError(status, f"Injected failure for {method} {path}")
            self._route(split.path, path, query, body)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._json(err.status, err.body if err.body is not None else {"error": err.message}, headers)
        except Exception as err:  # a server bug must surface as a 500, not a hung client
            self._json(500, {"error": f"local hub internal error: {err!r}"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # --- routing
    def _route(self, raw_path: str, path: str, query: dict, body: bytes):
        method = self.command
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/validate-yaml" and method == "POST":
            return self._json(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(json.loads(body or b"{}"))
        # match on the raw path: revisions and tree paths are %-quoted by the client (``/`` becomes %2F)
        m = _REPO_API.match(raw_path)
        if m:
            repo_type = m.group(1)[:-1]
            repo_id = unquote(m.group(2))
            rest = m.group(3) or ""
            return self._repo_api(method, repo_type, repo_id, rest, query, body)
        m = _RESOLVE.match(raw_path)
        if m and method in ("GET", "HEAD"):
            repo_type = (m.group(1) or "models")[:-1]
            return self._resolve_file(repo_type, unquote(m.group(2)), unquote(m.group(3)), unquote(m.group(4)))
        raise HubError(404, f"Not found: {method} {path}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: str, query: dict, body: bytes):
        parts = rest.split("/", 1) if rest else [""]
        action, arg = parts[0], unquote(parts[1]) if len(parts) > 1 else None
        if method == "GET" and action == "":
            return self._info(repo_type, repo_id, "main")
        if method == "GET" and action == "revision" and arg:
            return self._info(repo_type, repo_id, arg)
        if method == "GET" and action == "tree" and arg:
            rev, _, sub = parts[1].partition("/")
            return self._tree(repo_type, repo_id, unquote(rev), unquote(sub), query)
        if method == "POST" and action == "paths-info" and arg:
            return self._paths_info(repo_type, repo_id, arg, body)
        if method == "POST" and action == "preupload" and arg:
            return self._preupload(repo_type, repo_id, arg, json.loads(body or b"{}"))
        if method == "POST" and action == "commit" and arg:
            return self._commit(repo_type, repo_id, arg, query, body)
        if method == "GET" and action == "refs":
            return self._refs(repo_type, repo_id)
        if method == "GET" and action == "commits" and arg:
            return self._list_commits(repo_type, repo_id, arg)
        if method == "POST" and action == "branch" and arg:
            return self._create_branch(repo_type, repo_id, arg, json.loads(body or b"{}"))
        raise HubError(404, f"Not found: {method} /api/{repo_type}s/{repo_id}/{rest}")

    # --- endpoints
    def _whoami(self):
        self._json(200, {
            "type": "user", "id": "local-user", "name": USER, "fullname": "Local Hub User",
            "email": None, "canPay": False, "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
        })

    def _create_repo(self, payload: dict):
        hub = self.hub
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = hub._repo_url(repo_type, repo_id)
        with hub._lock:
            if (repo_type, repo_id) in hub._repos:
                # the real Hub answers 409 with the url; ``create_repo(exist_ok=True)`` reads it
                raise HubError(409, "You already created this model repo", body={
                    "error": "You already created this model repo", "url": url})
            private = payload.get("private") or payload.get("visibility") == "private"
            hub._create_repo(repo_type, repo_id, bool(private))
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, payload: dict):
        hub = self.hub
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        with hub._lock:
            hub._get_repo(repo_type, repo_id)
            del hub._repos[(repo_type, repo_id)]
            hub._save_state()
        self._json(200, {})

    def _info(self, repo_type: str, repo_id: str, revision: str):
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            commit = hub._resolve(repo, revision)
            siblings = [
                {"rfilename": p, "size": hub._sizes[oid], "blobId": oid} for p, oid in sorted(commit.tree.items())
            ]
            used = sum(hub._sizes[oid] for oid in commit.tree.values())
        self._json(200, {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "siblings": siblings, "usedStorage": used,
        })

    def _entries(self, commit: Commit) -> tuple[dict[str, dict], dict[str, dict]]:
        """File and folder tree entries (Hub JSON shape) of a commit, keyed by path."""
        sizes = self.hub._sizes
        files = {
            p: {"type": "file", "oid": oid, "size": sizes[oid], "path": p} for p, oid in commit.tree.items()
        }
        children: dict[str, list[str]] = {}
        for p, oid in commit.tree.items():
            parts = p.split("/")
            for i in range(1, len(parts)):
                children.setdefault("/".join(parts[:i]), []).append(f"{p}:{oid}")
        # a folder oid only needs to change when its content changes
        folders = {
            d: {"type": "directory", "oid": hashlib.sha1("\n".join(sorted(c)).encode()).hexdigest(), "path": d}
            for d, c in children.items()
        }
        return files, folders

    def _tree(self, repo_type: str, repo_id: str, revision: str, sub: str, query: dict):
        hub = self.hub
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        sub = sub.strip("/")
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            commit = hub._resolve(repo, revision)
            files, folders = self._entries(commit)
        if sub and sub not in folders:
            raise HubError(404, f"Entry not found: {sub}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        prefix = f"{sub}/" if sub else ""
        out = []
        for path, entry in sorted({**folders, **files}.items()):
            if not path.startswith(prefix):
                continue
            if not recursive and "/" in path[len(prefix):]:
                continue
            out.append(entry)
        self._json(200, out, {"X-Repo-Commit": commit.oid})

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes):
        hub = self.hub
        # the client sends form data (``paths`` repeated); accept JSON too
        if body.lstrip().startswith(b"{"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        with hub._lock:
            commit = hub._resolve(hub._get_repo(repo_type, repo_id), revision)
            files, folders = self._entries(commit)
        out = [files.get(p.strip("/")) or folders.get(p.strip("/")) for p in paths]
        self._json(200, [e for e in out if e is not None], {"X-Repo-Commit": commit.oid})

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict):
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            tree = hub._resolve(repo, revision).tree if revision in repo.branches else {}
        # "regular" everywhere: content travels base64-encoded inside the commit, no LFS/Xet upload step;
        # "oid" lets the client skip files that did not change, as with the real Hub
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": repo.branches.get(revision)})

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict, body: bytes):
        hub = self.hub
        if hub.fail_commits:
            raise HubError(500, "Injected commit failure")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((ln["value"] for ln in lines if ln.get("key") == "header"), {})
        create_pr = query.get("create_pr") in ("1", "true")
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            base = hub._resolve(repo, revision)
            parent = header.get("parentCommit")
            if parent and not base.oid.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(base.tree)
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    tree[value["path"]] = hub._store(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    if value["path"] not in tree:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del tree[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(prefix)]:
                        del tree[p]
                elif key == "lfsFile":
                    raise HubError(400, "This local hub only accepts regular (inline) files")
            branch = revision
            pr_url = None
            if create_pr:
                num = 1 + sum(1 for b in repo.branches if b.startswith("refs/pr/"))
                branch = f"refs/pr/{num}"
                repo.branches[branch] = base.oid
                pr_url = f"{hub._repo_url(repo_type, repo_id)}/discussions/{num}"
            elif revision not in repo.branches:
                raise HubError(400, f"Cannot commit to '{revision}': not a branch")
            commit = hub._new_commit(
                repo, branch, header.get("summary", ""), header.get("description", ""), tree)
        self._json(200, {
            "success": True, "commitOid": commit.oid, "commitMessage": commit.title, "hookOutput": "",
            "commitUrl": f"{hub._repo_url(repo_type, repo_id)}/commit/{commit.oid}", "pullRequestUrl": pr_url,
        })

    def _refs(self, repo_type: str, repo_id: str):
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                for b, oid in repo.branches.items() if not b.startswith("refs/")
            ]
            prs = [
                {"name": b, "ref": b, "targetCommit": oid}
                for b, oid in repo.branches.items()
                if b.startswith("refs/pr/")
            ]
        self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _list_commits(self, repo_type: str, repo_id: str, revision: str):
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            commit: Commit | None = hub._resolve(repo, revision)
            out = []
            while commit is not None:
                out.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                            "authors": [{"user": USER}], "date": commit.date})
                commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(200, out)

    def _create_branch(self, repo_type: str, repo_id: str, branch: str, payload: dict):
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            if branch in repo.branches:
                raise HubError(409, f"Reference {branch} already exists")
            repo.branches[branch] = hub._resolve(repo, payload.get("startingPoint") or "main").oid
            hub._save_state()
        self._json(200, {})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, filename: str):
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            commit = hub._resolve(repo, revision)
            oid = commit.tree.get(filename)
            data = hub._blob(oid) if oid else None
        if data is None:
            # X-Repo-Commit lets the client cache the non-existence of the file for this commit
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        self._send(200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"'},
                   content_type="application/octet-stream")


# ---------------------------------------------------------------------- client-side configuration
def hub_env(hub: LocalHub, home_dir: str | os.PathLike) -> dict[str, str]:
    """Environment variables making a *subprocess* use ``hub`` (merge into ``os.environ`` for ``subprocess.run``).

    The HF home and Hub cache live under ``home_dir`` so the subprocess never sees the user's cache or token.
    """
    home = Path(home_dir)
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN": DUMMY_TOKEN,
        "HF_HUB_DISABLE_XET": "1",  # hf_xet is installed; the local hub only speaks plain HTTP
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        "HUGGINGFACE_CO_STAGING": "0",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@contextlib.contextmanager
def use_local_hub(hub: LocalHub, cache_dir: str | os.PathLike):
    """Point the *current* process's ``huggingface_hub``/``transformers`` at ``hub`` and restore everything on exit.

    ``huggingface_hub.constants`` snapshots ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` at import time (and the resolve URL
    template derived from the endpoint), the module-level ``HfApi`` behind ``huggingface_hub.create_repo`` etc.
    and transformers's shared ``hf_api()`` instance keep the endpoint they were built with, so all of those are
    patched; transformers's offline check is ``huggingface_hub.is_offline_mode`` and follows the constant.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    try:
        from transformers.utils import hub as tf_hub
    except ImportError:  # transformers is optional for plain huggingface_hub tests
        tf_hub = None

    cache = str(Path(cache_dir))
    host = urlsplit(hub.endpoint).hostname
    constant_patches = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_CACHE": cache,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    env_patches = {"HF_TOKEN": DUMMY_TOKEN}
    saved_constants = {name: getattr(constants, name) for name in constant_patches}
    saved_env = {name: os.environ.get(name) for name in env_patches}
    saved_origins = _http._HUB_ORIGINS
    saved_api_endpoint = hf_api.api.endpoint
    saved_tf_api = tf_hub._hf_api if tf_hub is not None else None
    try:
        for name, value in constant_patches.items():
            setattr(constants, name, value)
        os.environ.update(env_patches)
        _http._HUB_ORIGINS = frozenset(saved_origins | {_http._url_origin(hub.endpoint)})
        hf_api.api.endpoint = hub.endpoint
        if tf_hub is not None:
            tf_hub._hf_api = None  # rebuilt lazily from the patched constants.ENDPOINT
        yield hub
    finally:
        for name, value in saved_constants.items():
            setattr(constants, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _http._HUB_ORIGINS = saved_origins
        hf_api.api.endpoint = saved_api_endpoint
        if tf_hub is not None:
            tf_hub._hf_api = saved_tf_api
