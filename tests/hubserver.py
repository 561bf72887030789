"""A loopback stand-in for the Hugging Face Hub (test code only), so the real huggingface_hub client runs.

    hub = HubServer().start()                  # 127.0.0.1, random port; hub.url -> HF_ENDPOINT
    commit = hub.add_repo("org/tiny", folder)  # folder (or {path: bytes}) becomes branch `main`
    hub.fail_first(2)                          # faults: 503s, a reset mid-file, slowness, a flipped byte
    hub.requests(path_contains="/resolve/")    # what the client asked for
    hub.stop()

What huggingface_hub 2.4 and transformers 5 ask of a hub, as served here:
  GET  /api/models/{repo}[/revision/{rev}]  -> {id, sha (40 hex), siblings, ...}
  GET  /api/models/{repo}/tree/{rev}[/{dir}]?recursive=  -> [{type, path, size, oid, lfs?}]
  HEAD|GET /{repo}/resolve/{rev}/{path}  -> X-Repo-Commit, ETag / X-Linked-Etag (sha256 of LFS
       files), Content-Length / X-Linked-Size, Range support (206) for resumed downloads
  (datasets: /api/datasets/... and /datasets/{repo}/resolve/...)
  misses -> 404 + X-Error-Code RepoNotFound | RevisionNotFound | EntryNotFound; gated -> 401 GatedRepo
*.safetensors, *.bin, *.pt, *.parquet, *.gguf are treated as LFS files (listed with lfs.oid = sha256). Commits are
fake but stable: a sha1 over the repo's paths and git blob ids.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".gguf")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str  # as sent, query included
    status: int = 0
    range: str | None = None
    authorization: str | None = None


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False


@dataclass
class _Fault:
    kind: str  # "status" | "reset" | "slow" | "corrupt"
    match: str  # substring of the request path ("" = any)
    times: int | None  # None = forever
    status: int = 503
    seconds: float = 0.0


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], _Repo] = {}  # (repo_type, repo_id) -> repo
        self.tokens: set[str] = set()  # accepted for gated repos
        self.log: list[Request] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._resets: set[int] = set()
        self._conns: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ setup
    def start(self) -> "HubServer":
        hub = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address):  # a client that gave up is not an error
                import sys

                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

            def shutdown_request(self, request):  # a "reset" response ends with RST, not FIN
                if id(request) in hub._resets:
                    hub._resets.discard(id(request))
                    request.close()
                else:
                    super().shutdown_request(request)

        self._httpd = Server(("127.0.0.1", 0), _make_handler(self))
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections (clients then see the hub as gone)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add_repo(self, repo_id: str, files: Path | dict[str, bytes], *, branch: str = "main",
                 gated: bool = False, repo_type: str = "model") -> str:
        """Publish `files` (a folder, recursively, or {path: bytes}) as `branch`; returns the commit sha."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        content = dict(sorted(files.items()))
        commit = hashlib.sha1(
            "".join(f"{p}\0{git_blob_sha1(d)}\n" for p, d in content.items()).encode() + repo_id.encode()
        ).hexdigest()
        repo = self.repos.setdefault((repo_type, repo_id), _Repo())
        repo.commits[commit] = content
        repo.refs[branch] = commit
        repo.gated = repo.gated or gated
        return commit

    # ------------------------------------------------------------------ faults
    def fail_first(self, k: int, status: int = 503, match: str = "") -> None:
        """Answer the next k requests (whose path contains `match`) with `status`."""
        self._faults.append(_Fault("status", match, k, status=status))

    def reset_mid_file(self, filename: str, times: int | None = 1, rst: bool = True) -> None:
        """Send half of the file, then drop the connection: with a RST (reset), or a FIN (cut short)."""
        self._faults.append(_Fault("reset", filename, times, status=1 if rst else 0))

    def slow(self, seconds: float, times: int | None = 1, match: str = "") -> None:
        """Wait `seconds` before answering the next `times` matching requests."""
        self._faults.append(_Fault("slow", match, times, seconds=seconds))

    def corrupt(self, filename: str, times: int | None = 1) -> None:
        """Flip one byte in the middle of `filename`'s body (same size, wrong content)."""
        self._faults.append(_Fault("corrupt", filename, times))

    def _take(self, kind: str, path: str, method: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.kind != kind or f.match not in path or f.times == 0:
                    continue
                if kind in ("reset", "corrupt") and (method != "GET" or "/resolve/" not in path):
                    continue
                if f.times is not None:
                    f.times -= 1
                return f
        return None

    # ------------------------------------------------------------------ inspection
    def requests(self, method: str | None = None, path_contains: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method) and path_contains in r.path]

    def file_requests(self) -> list[Request]:
        """HEAD/GET requests for file contents (`/resolve/`)."""
        return self.requests(path_contains="/resolve/")

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    # ------------------------------------------------------------------ routing helpers
    def resolve(self, key: tuple[str, str], rev: str) -> tuple[int, str | None, str | None]:
        """(status, error code, commit) for (repo_type, repo_id)@rev."""
        repo = self.repos.get(key)
        if repo is None:
            return 404, "RepoNotFound", None
        commit = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if commit is None:
            return 404, "RevisionNotFound", None
        return 200, None, commit


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real hub
        server_version = "kdflow-test-hub"

        def log_message(self, *args) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            with hub._lock:
                hub._conns.add(self.connection)

        def finish(self) -> None:
            with hub._lock:
                hub._conns.discard(self.connection)
            super().finish()

        def do_HEAD(self) -> None:
            self._handle(head=True)

        def do_GET(self) -> None:
            self._handle(head=False)

        # -------------------------------------------------------------- plumbing
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  head: bool = False, length: int | None = None) -> None:
            self._entry.status = status
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, obj, head: bool = False) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head=head)

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None,
                   head: bool = False) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

        # -------------------------------------------------------------- routes
        def _handle(self, head: bool) -> None:
            self._entry = Request(self.command, self.path, range=self.headers.get("Range"),
                                  authorization=self.headers.get("Authorization"))
            with hub._lock:
                hub.log.append(self._entry)
            if (f := hub._take("slow", self.path, self.command)) is not None:
                time.sleep(f.seconds)
            if (f := hub._take("status", self.path, self.command)) is not None:
                return self._error(f.status, None, f"injected HTTP {f.status}", head=head)
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            query = parse_qs(url.query)
            if parts[0] == "api" and parts[1:2] in (["models"], ["datasets"]) and len(parts) >= 4:
                return self._api((parts[1][:-1], f"{parts[2]}/{parts[3]}"), parts[4:], query, head)
            kind = "dataset" if parts[0] == "datasets" else "model"
            parts = parts[1:] if kind == "dataset" else parts
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve((kind, f"{parts[0]}/{parts[1]}"), parts[3], "/".join(parts[4:]), head)
            return self._error(404, None, f"no route for {url.path}", head=head)

        def _api(self, key: tuple[str, str], rest: list[str], query: dict, head: bool) -> None:
            rev = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree") else "main"
            status, code, commit = hub.resolve(key, rev)
            repo_id = key[1]
            if status != 200:
                return self._error(status, code, f"{code}: {repo_id}@{rev}", head=head)
            files = hub.repos[key].commits[commit]
            if not rest or rest[0] == "revision":
                return self._json({
                    "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": "manual" if hub.repos[key].gated else False, "disabled": False,
                    "tags": ["transformers", "safetensors"], "library_name": "transformers",
                    "siblings": [{"rfilename": p} for p in files],
                }, head=head)
            if rest[0] == "tree":
                prefix = "/".join(rest[2:])
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(_tree(files, prefix, recursive), head=head)
            return self._error(404, None, f"unknown api route {rest}", head=head)

        def _resolve(self, key: tuple[str, str], rev: str, path: str, head: bool) -> None:
            status, code, commit = hub.resolve(key, rev)
            repo_id = key[1]
            if status != 200:
                return self._error(status, code, f"{code}: {repo_id}@{rev}", head=head)
            if hub.repos[key].gated and (self._entry.authorization or "").removeprefix("Bearer ") not in hub.tokens:
                return self._error(401, "GatedRepo", f"Access to {key[0]} {repo_id} is restricted.", head=head)
            data = hub.repos[key].commits[commit].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} not found", commit=commit, head=head)
            lfs = path.endswith(LFS_SUFFIXES)
            etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if lfs:
                headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
            if head:
                return self._send(200, b"", headers, head=True, length=len(data))
            if hub._take("corrupt", self.path, "GET") is not None:
                flipped = bytearray(data)
                flipped[len(data) // 2] ^= 0xFF
                data = bytes(flipped)
            start = 0
            if (rng := self.headers.get("Range", "")).startswith("bytes="):
                start = int(rng[6:].split("-")[0] or 0)
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body, status = data[start:], 206 if start else 200
            if (f := hub._take("reset", self.path, "GET")) is not None:
                self._entry.status = status
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                if f.status:  # SO_LINGER 0: close() sends RST, like a dropped connection
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    hub._resets.add(id(self.connection))
                return
            self._send(status, body, headers)

    return Handler


def _tree(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    """Entries under `prefix` as the hub's tree endpoint lists them (directories included)."""
    base = f"{prefix}/" if prefix else ""
    out, dirs = [], set()
    for path, data in files.items():
        if not path.startswith(base):
            continue
        rel = path[len(base):].split("/")
        for i in range(1, len(rel)):  # directories on the way
            d = base + "/".join(rel[:i])
            if (recursive or i == 1) and d not in dirs:
                dirs.add(d)
                out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
        if len(rel) > 1 and not recursive:
            continue
        entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if path.endswith(LFS_SUFFIXES):  # git stores a pointer; the hub lists its blob id and the LFS oid
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            entry["oid"] = git_blob_sha1(pointer)
            entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": len(pointer)}
        out.append(entry)
    return out
