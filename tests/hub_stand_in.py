"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for tests that push and download edits offline.

It answers what huggingface_hub (2.x) asks for `create_repo`, `create_branch`, `upload_folder` (preupload: every
file "regular", so contents travel base64 in the NDJSON commit and nothing goes through LFS or Xet), `repo_info`,
`list_repo_tree`, `hf_hub_download`/`snapshot_download` (`resolve`, HEAD and GET) and `whoami`, keeps the repos in
memory as commits of {path: bytes}, and records every request and every commit, so a test can assert that a refused
push uploaded nothing. One token is valid; a repo id in `claimed_as` is answered as a repo of that other type (the
server's word that OWNER/NAME is, say, a dataset).

    with HubStandIn() as hub:       # hub.url for HF_ENDPOINT, hub.token for HF_TOKEN
        ...
        assert hub.commits == []
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
TOKEN = "hf_standin_token"


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)          # branch -> commit oid
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.snapshots else None

    def commit(self, parent: str | None, files: dict[str, bytes], message: str, deleted=()) -> str:
        tree = {**(self.snapshots.get(parent, {}) if parent else {}), **files}
        for path in deleted:
            tree.pop(path, None)
        digest = hashlib.sha1(f"{parent}\n{message}\n".encode())
        for path in sorted(tree):
            digest.update(path.encode() + b"\0" + tree[path])
        oid = digest.hexdigest()
        self.snapshots[oid] = tree
        return oid


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubStandIn:
    def __init__(self, claimed_as: dict[str, str] | None = None):
        self.repos: dict[str, Repo] = {}
        self.claimed_as = claimed_as or {}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []     # {"repo", "revision", "paths", "message"}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.token = TOKEN

    def __enter__(self) -> HubStandIn:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Put a model repo with `files` on main straight into the server (no request recorded); its commit oid."""
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        repo.branches["main"] = repo.commit(repo.branches.get("main"), files, "seeded by the test")
        return repo.branches["main"]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.snapshots[repo.resolve(revision)]


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: pytest shows failures, not access logs
            pass

        # ------------------------------------------------------------------------------------------ plumbing
        def reply(self, status: int, body=None, headers: dict | None = None, error_code: str | None = None):
            data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            headers = dict(headers or {})
            headers.setdefault("Content-Type", "application/json")
            if error_code:
                headers["X-Error-Code"] = error_code
                headers["X-Error-Message"] = error_code
            headers["Content-Length"] = str(len(data))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def token(self) -> str | None:
            value = self.headers.get("Authorization") or ""
            return value.removeprefix("Bearer ") or None

        def authorized(self, required: bool) -> bool:
            """False (401 sent) for a wrong token, or for none where `required`."""
            token = self.token()
            if token is None and not required or token == TOKEN:
                return True
            self.reply(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and self.token() != TOKEN):
                self.reply(404, {"error": "Repository not found"}, error_code="RepoNotFound")
                return None
            return repo

        def revision(self, repo: Repo, revision: str) -> str | None:
            oid = repo.resolve(revision)
            if oid is None:
                self.reply(404, {"error": f"Invalid rev id: {revision}"}, error_code="RevisionNotFound")
            return oid

        def route(self):
            split = urlsplit(self.path)
            parts = split.path.strip("/").split("/")
            hub.requests.append((self.command, split.path))
            if not self.authorized(required=False):
                return
            if parts[:1] == ["api"]:
                return self.api(parts[1:], parse_qs(split.query))
            if len(parts) >= 5 and parts[2] == "resolve":
                return self.resolve(f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])))
            self.reply(404, {"error": "not found"})

        do_GET = do_HEAD = do_POST = route

        # ------------------------------------------------------------------------------------------ endpoints
        def api(self, parts: list[str], query: dict):
            if parts == ["whoami-v2"]:
                if self.authorized(required=True):
                    self.reply(200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}})
                return
            if parts == ["repos", "create"]:
                return self.create_repo()
            if parts == ["validate-yaml"]:
                self.body()
                return self.reply(200, {"errors": [], "warnings": []})
            if len(parts) < 3 or parts[0] != "models":
                return self.reply(404, {"error": "not found"}, error_code="RepoNotFound")
            repo_id, action, rest = f"{parts[1]}/{parts[2]}", (parts + [""])[3], [unquote(p) for p in parts[4:]]
            if action in ("revision", ""):
                return self.info(repo_id, rest[0] if rest else "main")
            if action == "tree":
                return self.tree(repo_id, rest[0], "/".join(rest[1:]))
            if action in ("preupload", "commit", "branch"):
                if not self.authorized(required=True):
                    return
                return getattr(self, action)(repo_id, "/".join(rest))
            self.reply(404, {"error": "not found"})

        def create_repo(self):
            if not self.authorized(required=True):
                return
            payload = json.loads(self.body())
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            kind = hub.claimed_as.get(repo_id, payload.get("type") or "model")
            url = f"{hub.url}/{repo_id}" if kind == "model" else f"{hub.url}/{kind}s/{repo_id}"
            with hub.lock:
                if repo_id in hub.repos or kind != "model":
                    return self.reply(409, {"error": "You already created this model repo", "url": url})
                repo = hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
                repo.branches["main"] = repo.commit(None, {".gitattributes": b"*.safetensors filter=lfs\n"},
                                                    "initial commit")
            self.reply(200, {"url": url, "name": repo_id})

        def branch(self, repo_id: str, name: str):
            repo = self.repo(repo_id)
            if repo is None:
                return
            self.body()
            if name in repo.branches:
                return self.reply(409, {"error": "Reference already exists"})
            repo.branches[name] = repo.branches["main"]
            self.reply(200, {})

        def preupload(self, repo_id: str, revision: str):
            repo = self.repo(repo_id)
            if repo is None or self.revision(repo, revision) is None:
                return
            files = json.loads(self.body())["files"]
            self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]})

        def commit(self, repo_id: str, revision: str):
            repo = self.repo(repo_id)
            if repo is None or self.revision(repo, revision) is None:
                return
            lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files, deleted = {}, []
            for line in lines:
                if line["key"] == "file":
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] == "deletedFile":
                    deleted.append(line["value"]["path"])
                elif line["key"] != "header":
                    return self.reply(400, {"error": f"the stand-in takes regular files only, not {line['key']}"})
            with hub.lock:
                oid = repo.commit(repo.branches[revision], files, header["summary"], deleted)
                repo.branches[revision] = oid
                hub.commits.append({"repo": repo_id, "revision": revision, "paths": sorted(files),
                                    "message": header["summary"]})
            self.reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})

        def info(self, repo_id: str, revision: str):
            repo = self.repo(repo_id)
            oid = repo and self.revision(repo, revision)
            if oid is None:
                return
            self.reply(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private,
                             "siblings": [{"rfilename": path} for path in sorted(repo.snapshots[oid])]})

        def tree(self, repo_id: str, revision: str, folder: str):
            repo = self.repo(repo_id)
            oid = repo and self.revision(repo, revision)
            if oid is None:
                return
            prefix = f"{folder}/" if folder else ""
            self.reply(200, [{"type": "file", "path": path, "size": len(content), "oid": git_blob_id(content)}
                             for path, content in sorted(repo.snapshots[oid].items()) if path.startswith(prefix)])

        def resolve(self, repo_id: str, revision: str, path: str):
            repo = self.repo(repo_id)
            oid = repo and self.revision(repo, revision)
            if oid is None:
                return
            content = repo.snapshots[oid].get(path)
            if content is None:
                return self.reply(404, {"error": "Entry not found"}, error_code="EntryNotFound")
            self.reply(200, content, {"Content-Type": "application/octet-stream", "X-Repo-Commit": oid,
                                      "ETag": f'"{git_blob_id(content)}"'})

    return Handler
