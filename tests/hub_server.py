"""A Hub-compatible test server on 127.0.0.1 (stdlib only), enough for the real `huggingface_hub` client.

Covers what create_repo, upload_folder (plain LFS, not Xet), model_info, tree listing, snapshot_download,
hf_hub_download and `from_pretrained` use (see ../shared/reference/hub-protocol.md). State lives in
memory. `fail_next` injects an error into the next request whose path contains a given fragment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".h5", ".msgpack", ".model", ".onnx")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:  # the etag the client expects: sha256 for LFS, git blob sha1 otherwise
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Repo:
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # sha -> files
    branches: dict[str, str] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.failures: list[list] = []  # [path fragment, status, remaining times]
        self.requests: list[str] = []
        self.require_token = False  # answer 401 to /api writes that carry no Authorization header

    def fail_next(self, fragment: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests whose path contains ``fragment`` with ``status``."""
        self.failures.append([fragment, status, times])

    def create(self, repo_id: str) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            repo = Repo()
            sha = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
            repo.commits[sha] = {".gitattributes": StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                                              False)}
            repo.branches["main"] = sha
            repo.history.append(sha)
            self.repos[repo_id] = repo
            return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # --- plumbing -------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, extra: dict | None = None, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, b"" if head else body, {"X-Error-Code": code, "X-Error-Message": message,
                                                   "Content-Type": "application/json", **(extra or {})}, head=head)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _segments(self) -> tuple[list[str], dict]:
        parts = urlsplit(self.path)
        return [unquote(s) for s in parts.path.split("/")[1:]], parse_qs(parts.query)

    def _unauthorized(self) -> bool:
        if self.state.require_token and self.command == "POST" and not self.headers.get("Authorization"):
            self._body()
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return True
        return False

    def _injected(self) -> bool:
        for i, (fragment, status, times) in enumerate(self.state.failures):
            if fragment in self.path:
                if times <= 1:
                    del self.state.failures[i]
                else:
                    self.state.failures[i][2] -= 1
                self._body()
                self._error(status, "Injected", f"injected failure for {fragment}")
                return True
        return False

    def _repo_at(self, ns: str, name: str, rev: str) -> tuple[Repo, str] | None:
        """The repository and the commit ``rev`` names, or None after answering 404."""
        repo = self._repo(ns, name)
        if repo is None:
            return None
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Revision {rev} not found")
            return None
        return repo, sha

    def _repo(self, ns: str, name: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(f"{ns}/{name}")
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {ns}/{name} not found", head=head)
        return repo

    # --- verbs --------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._resolve(head=True)

    def do_GET(self) -> None:
        seg, query = self._segments()
        self.state.requests.append(f"GET {self.path}")
        if self._injected():
            return
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            if len(seg) >= 6 and seg[4] == "tree":
                return self._tree(seg[2], seg[3], seg[5], "/".join(seg[6:]), query)
            rev = seg[5] if len(seg) >= 6 and seg[4] == "revision" else "main"
            return self._info(seg[2], seg[3], rev)
        if "resolve" in seg:
            return self._resolve(head=False)
        self._error(404, "NotFound", f"no route for GET {self.path}")

    def do_PUT(self) -> None:
        seg, _ = self._segments()
        self.state.requests.append(f"PUT {self.path}")
        if self._injected():
            return
        data = self._body()
        if seg[:1] == ["lfs-upload"] and hashlib.sha256(data).hexdigest() == seg[1]:
            self.state.lfs[seg[1]] = data
            return self._send(200)
        self._error(400, "BadRequest", "LFS object does not match its oid")

    def do_POST(self) -> None:
        seg, query = self._segments()
        self.state.requests.append(f"POST {self.path}")
        if self._injected() or self._unauthorized():
            return
        body = self._body()
        if seg == ["api", "repos", "create"]:
            return self._create(json.loads(body))
        if seg == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []})
        if len(seg) >= 6 and seg[:2] == ["api", "models"] and seg[4] == "preupload":
            return self._preupload(seg[2], seg[3], seg[5], json.loads(body))
        if len(seg) == 6 and seg[:2] == ["api", "models"] and seg[4] == "branch":
            repo = self._repo(seg[2], seg[3])
            if repo is None:
                return None
            if seg[5] in repo.branches:
                return self._error(409, "Conflict", f"branch {seg[5]} exists")
            repo.branches[seg[5]] = repo.branches["main"]
            return self._json(200, {})
        if len(seg) >= 6 and seg[:2] == ["api", "models"] and seg[4] == "commit":
            return self._commit(seg[2], seg[3], seg[5], body, query)
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(json.loads(body))
        self._error(404, "NotFound", f"no route for POST {self.path}")

    # --- handlers -----------------------------------------------------------------------------------------
    def _create(self, data: dict) -> None:
        repo_id = f"{data.get('organization') or 'user'}/{data['name']}"
        created = self.state.create(repo_id)
        self._json(200 if created else 409, {"url": f"{self._base()}/{repo_id}", "name": repo_id})

    def _info(self, ns: str, name: str, rev: str) -> None:
        found = self._repo_at(ns, name, rev)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        siblings = [{"rfilename": p, "size": f.data.__len__(), "blobId": git_blob_sha1(f.data),
                     **({"lfs": {"sha256": f.oid, "size": len(f.data), "pointerSize": 134}} if f.lfs else {})}
                    for p, f in sorted(files.items())]
        self._json(200, {"id": f"{ns}/{name}", "modelId": f"{ns}/{name}", "sha": sha, "siblings": siblings,
                         "private": False, "tags": [], "downloads": 0, "likes": 0})

    def _tree(self, ns: str, name: str, rev: str, prefix: str, query: dict) -> None:
        found = self._repo_at(ns, name, rev)
        if found is None:
            return
        repo, sha = found
        recursive = query.get("recursive", ["false"])[0] == "true"
        entries, dirs = [], set()
        for path, f in sorted(repo.commits[sha].items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            if "/" in rest and not recursive:
                dirs.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            entry = {"type": "file", "path": path, "size": len(f.data), "oid": git_blob_sha1(f.data)}
            if f.lfs:
                entry["lfs"] = {"oid": f.oid, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(dirs)]
        self._json(200, entries)

    def _preupload(self, ns: str, name: str, rev: str, data: dict) -> None:
        repo = self._repo(ns, name)
        if repo is None:
            return
        current = repo.commits[repo.resolve(rev) or repo.branches["main"]]
        files = []
        for item in data["files"]:
            sample = base64.b64decode(item.get("sample", ""))
            lfs = item["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or item["size"] >= 10_000_000
            existing = current.get(item["path"])
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": existing.oid if existing is not None else None})
        self._json(200, {"files": files})

    def _lfs_batch(self, data: dict) -> None:
        objects = []
        for obj in data["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self._base()}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _commit(self, ns: str, name: str, rev: str, body: bytes, query: dict) -> None:
        found = self._repo_at(ns, name, rev)
        if found is None:
            return
        repo, parent = found
        files = dict(repo.commits[parent])
        summary = ""
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value.get("summary", "")
            elif item["key"] == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = StoredFile(self.state.lfs[value["oid"]], True)
            elif item["key"] in ("deletedFile", "deletedFolder"):
                for path in [p for p in files if p == value["path"] or p.startswith(value["path"] + "/")]:
                    del files[path]
        sha = hashlib.sha1(f"{parent}{summary}{len(repo.history)}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.history.append(sha)
        repo.branches[rev if rev in repo.branches else "main"] = sha
        self._json(200, {"commitOid": sha, "commitUrl": f"{self._base()}/{ns}/{name}/commit/{sha}"})

    def _resolve(self, head: bool) -> None:
        seg, _ = self._segments()
        if head:
            self.state.requests.append(f"HEAD {self.path}")
        if len(seg) < 5 or seg[2] != "resolve":
            return self._error(404, "NotFound", f"no route for {self.path}", head=head)
        repo = self._repo(seg[0], seg[1], head=head)
        if repo is None:
            return
        sha = repo.resolve(seg[3])
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Revision {seg[3]} not found", head=head)
        stored = repo.commits[sha].get("/".join(seg[4:]))
        if stored is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha}, head=head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{stored.oid}"'}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.oid}"', "X-Linked-Size": str(len(stored.data))})
        data = stored.data
        start = self.headers.get("Range", "")
        if start.startswith("bytes=") and start[6:].split("-")[0]:
            offset = int(start[6:].split("-")[0])
            headers["Content-Range"] = f"bytes {offset}-{len(data) - 1}/{len(data)}"
            return self._send(206, data[offset:], headers, head=head)
        self._send(200, data, headers, head=head)


class HubServer:
    """Start with `HubServer()` (a free port on 127.0.0.1); `endpoint` is the URL; `close()` stops it."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
