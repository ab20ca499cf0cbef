"""A small Hugging Face Hub look-alike on 127.0.0.1 that the real huggingface_hub client talks to.

It answers the calls snapshot_download makes: the revision info API, the tree listing, HEAD/GET on
/resolve/ (small files served directly, LFS files redirected to a second "CDN" server that honours
Range requests), with the Hub's error headers. It never advertises Xet, so plain HTTP is used.
Every request is recorded, and faults can be switched on per test.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO = "bartowski/starcoder2-15b-instruct-v0.1-exl2"
MODEL_BRANCHES = ("4_25", "6_5")
SHARDS = ("output-00001-of-00002.safetensors", "output-00002-of-00002.safetensors")
NOT_MODEL_FILES = ("README.md", "measurement.json", ".gitattributes")


@dataclass(frozen=True)
class HubFile:
    """One file of a branch, with the ids the Hub derives from its content."""

    path: str
    data: bytes
    lfs: bool

    @property
    def blob_id(self) -> str:
        """The git blob id, which is the ETag of a small file."""
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        """The LFS object id, which is the ETag of an LFS file."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        """The name huggingface_hub gives this file's blob in its cache."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass(frozen=True)
class Branch:
    """A branch: its head commit and files."""

    commit: str
    files: dict[str, HubFile]


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int = 0
    body_bytes: int = 0


def safetensors_bytes(prefix: str, elements: int, seed: int) -> bytes:
    """A valid safetensors file with one F16 tensor of random content."""
    payload = random.Random(seed).randbytes(elements * 2)
    header = {
        "__metadata__": {"format": "pt"},
        f"{prefix}.weight": {
            "dtype": "F16",
            "shape": [elements],
            "data_offsets": [0, len(payload)],
        },
    }
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + payload


def model_files(branch: str) -> dict[str, bytes]:
    """A tiny EXL2-like model folder whose shard bytes differ per branch."""
    seed = sum(map(ord, branch))
    bits = float(branch.replace("_", "."))
    shards = {
        SHARDS[0]: safetensors_bytes("model.layers.0", 150_000 + seed, seed),
        SHARDS[1]: safetensors_bytes("lm_head", 100_000 + seed, seed + 1),
    }
    config = {
        "architectures": ["Starcoder2ForCausalLM"],
        "model_type": "starcoder2",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "quantization_config": {"quant_method": "exl2", "bits": bits, "head_bits": 6},
    }
    index = {
        "metadata": {"total_size": sum(len(data) for data in shards.values())},
        "weight_map": {"model.layers.0.weight": SHARDS[0], "lm_head.weight": SHARDS[1]},
    }
    return {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": f"# StarCoder2 15B Instruct EXL2 {bits} bpw\n".encode(),
        "measurement.json": b'{"measurement": {}}',
        "config.json": json.dumps(config).encode(),
        "generation_config.json": b'{"bos_token_id": 0, "eos_token_id": 0}',
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}}}',
        "tokenizer_config.json": b'{"eos_token": "<|endoftext|>"}',
        "special_tokens_map.json": b'{"eos_token": "<|endoftext|>"}',
        "output.safetensors.index.json": json.dumps(index).encode(),
        **shards,
    }


def _branch(name: str, contents: dict[str, bytes]) -> Branch:
    """Build a branch with a commit id derived from its name and content."""
    digest = hashlib.sha1(name.encode())
    for path in sorted(contents):
        digest.update(path.encode() + contents[path])
    files = {
        path: HubFile(path, data, lfs=path.endswith(".safetensors"))
        for path, data in contents.items()
    }
    return Branch(commit=digest.hexdigest(), files=files)


@dataclass
class FakeHub:
    """The state behind the two servers, plus switches for faults."""

    repos: dict[str, dict[str, Branch]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    # "private" (401 RepoNotFound), "unauthorized" (401 bad token), "gated" (403), "server_error".
    status_fault: str | None = None
    truncate: set[str] = field(default_factory=set)  # these files always stop halfway
    drop_once: set[str] = field(default_factory=set)  # these stop halfway once, then resume
    short: set[str] = field(default_factory=set)  # complete responses, but a quarter too short
    token: str | None = None  # the HF_TOKEN that "private"/"gated" repos accept
    endpoint: str = ""
    cdn: str = ""

    def __post_init__(self) -> None:
        main = {name: model_files("4_25")[name] for name in NOT_MODEL_FILES}
        branches = {"main": _branch("main", main)}
        branches |= {name: _branch(name, model_files(name)) for name in MODEL_BRANCHES}
        self.repos.setdefault(REPO, branches)
        self._lock = threading.Lock()
        self._dropped: set[str] = set()
        self._servers: list[ThreadingHTTPServer] = []

    def start(self) -> FakeHub:
        """Start the Hub and CDN servers on free ports."""
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.hub = self  # type: ignore[attr-defined]
            server.role = role  # type: ignore[attr-defined]
            serve = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
            serve.start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        # Another host name, as the real CDN has: huggingface_hub follows same-host redirects.
        self.cdn = f"http://localhost:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        """Stop both servers (again is fine)."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def record(self, request: Request) -> None:
        """Remember one request."""
        with self._lock:
            self.requests.append(request)

    def first_drop(self, path: str) -> bool:
        """Whether this transfer of a drop_once file is the one to break off."""
        with self._lock:
            if path in self.drop_once and path not in self._dropped:
                self._dropped.add(path)
                return True
            return False

    def file_transfers(self) -> list[Request]:
        """GET requests that sent file content (from /resolve/ or the CDN)."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.body_bytes > 0]

    def transferred_files(self) -> set[str]:
        """Names of the files whose content was sent at least once."""
        names = set()
        for request in self.file_transfers():
            if "/resolve/" in request.path:
                names.add(unquote(request.path.split("/resolve/", 1)[1].split("/", 1)[1]))
            else:
                names.add(self.lfs_name(request.path.rsplit("/", 1)[1]))
        return names

    def lfs_name(self, sha256: str) -> str:
        """The file path behind an LFS object id."""
        for branches in self.repos.values():
            for branch in branches.values():
                for file in branch.files.values():
                    if file.lfs and file.sha256 == sha256:
                        return file.path
        raise KeyError(sha256)

    def find_lfs(self, sha256: str) -> HubFile | None:
        """The LFS file with this object id, if any."""
        try:
            name = self.lfs_name(sha256)
        except KeyError:
            return None
        for branches in self.repos.values():
            for branch in branches.values():
                if name in branch.files and branch.files[name].sha256 == sha256:
                    return branch.files[name]
        return None

    def branch(self, repo: str, revision: str) -> Branch | None:
        """A branch by name or by commit id."""
        branches = self.repos.get(repo, {})
        if revision in branches:
            return branches[revision]
        return next((b for b in branches.values() if b.commit == revision), None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        request = Request(
            method=self.command,
            path=urlsplit(self.path).path,
            range=self.headers.get("Range"),
            authorization=self.headers.get("Authorization"),
        )
        self.hub.record(request)
        if self.server.role == "cdn":  # type: ignore[attr-defined]
            self._serve_cdn(request, head=head)
            return
        if self._fault(request):
            return
        parts = [unquote(part) for part in request.path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            branch = self._branch_or_error(request, repo, revision)
            if branch is None:
                return
            if kind == "revision":
                query = parse_qs(urlsplit(self.path).query)
                blobs = [value.lower() for value in query.get("blobs", [])] == ["true"]
                self._json(request, _model_info(repo, branch, blobs=blobs))
            elif kind == "tree":
                self._json(request, [_tree_entry(file) for file in branch.files.values()])
            else:
                self._error(request, 404, None, "Not found")
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, revision, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            branch = self._branch_or_error(request, repo, revision)
            if branch is None:
                return
            file = branch.files.get(name)
            if file is None:
                self._error(request, 404, "EntryNotFound", f"{name} does not exist", branch.commit)
            elif file.lfs:
                self._redirect_to_cdn(request, branch, file)
            else:
                headers = {"ETag": f'"{file.blob_id}"', "X-Repo-Commit": branch.commit}
                self._send_file(request, file, headers, head=head)
        else:
            self._error(request, 404, None, "Not found")

    def _fault(self, request: Request) -> bool:
        """Answer with the configured Hub error, unless the right token was sent."""
        fault = self.hub.status_fault
        if fault is None or (
            self.hub.token is not None and request.authorization == f"Bearer {self.hub.token}"
        ):
            return False
        if fault == "private":
            self._error(request, 401, "RepoNotFound", "Repository not found")
        elif fault == "unauthorized":
            self._error(request, 401, None, "Invalid credentials in Authorization header")
        elif fault == "gated":
            message = f"Access to model {REPO} is restricted. You must have access to it."
            self._error(request, 403, "GatedRepo", message)
        elif fault == "server_error":
            self._error(request, 500, None, "Internal Error - We're working hard to fix this.")
        else:
            raise ValueError(f"unknown fault {fault!r}")
        return True

    def _branch_or_error(self, request: Request, repo: str, revision: str) -> Branch | None:
        """The branch, or None after sending the Hub's 404 for a missing repo or revision."""
        if repo not in self.hub.repos:
            self._error(request, 404, "RepoNotFound", "Repository not found")
            return None
        branch = self.hub.branch(repo, revision)
        if branch is None:
            self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return branch

    def _redirect_to_cdn(self, request: Request, branch: Branch, file: HubFile) -> None:
        """LFS files live elsewhere: the Hub redirects and names the object in X-Linked-*."""
        request.status = 302
        self.send_response(302)
        self.send_header("Location", f"{self.hub.cdn}/lfs/{file.sha256}")
        self.send_header("X-Repo-Commit", branch.commit)
        self.send_header("X-Linked-Etag", f'"{file.sha256}"')
        self.send_header("X-Linked-Size", str(len(file.data)))
        self.send_header("ETag", f'"{file.blob_id}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve_cdn(self, request: Request, *, head: bool) -> None:
        """Serve an LFS object by its sha256, with Range support."""
        file = self.hub.find_lfs(request.path.rsplit("/", 1)[-1])
        if file is None:
            self._error(request, 404, None, "NoSuchKey")
            return
        self._send_file(request, file, {"ETag": f'"{file.sha256}"'}, head=head)

    def _send_file(
        self, request: Request, file: HubFile, headers: dict[str, str], *, head: bool
    ) -> None:
        """Send a file or the requested range of it, applying any body fault."""
        data, start = file.data, 0
        if request.range and request.range.startswith("bytes="):
            start = int(request.range[len("bytes=") :].split("-", 1)[0])
        status = 206 if start else 200
        body = data[start:]
        declared = len(body)
        cut = len(data) // 2
        stop_early = not head and (
            file.path in self.hub.truncate or (start < cut and self.hub.first_drop(file.path))
        )
        if not head and file.path in self.hub.short:
            body = body[: len(body) - len(data) // 4]
            declared = len(body)
        if stop_early:
            body = data[start:cut] if start < cut else b""
        request.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(declared))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        self.wfile.write(body)
        self.wfile.flush()
        request.body_bytes = len(body)
        if stop_early:
            self.close_connection = True  # the client sees fewer bytes than Content-Length

    def _json(self, request: Request, payload: object) -> None:
        body = json.dumps(payload).encode()
        request.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(
        self,
        request: Request,
        status: int,
        code: str | None,
        message: str,
        commit: str | None = None,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        request.status = status
        self.send_response(status)
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _model_info(repo: str, branch: Branch, *, blobs: bool) -> dict:
    """The revision info API's answer; with blobs=True the siblings carry sizes and ids."""
    siblings = []
    for file in branch.files.values():
        sibling: dict = {"rfilename": file.path}
        if blobs:
            sibling |= {"blobId": file.blob_id, "size": len(file.data)}
            if file.lfs:
                sibling["lfs"] = {"sha256": file.sha256, "size": len(file.data), "pointerSize": 134}
        siblings.append(sibling)
    return {
        "_id": "0" * 24,
        "id": repo,
        "modelId": repo,
        "author": repo.split("/")[0],
        "sha": branch.commit,
        "lastModified": "2024-05-01T00:00:00.000Z",
        "createdAt": "2024-05-01T00:00:00.000Z",
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": ["exl2"],
        "siblings": siblings,
    }


def _tree_entry(file: HubFile) -> dict:
    """One entry of the tree listing API."""
    entry: dict = {"type": "file", "oid": file.blob_id, "size": len(file.data), "path": file.path}
    if file.lfs:
        entry["lfs"] = {"oid": file.sha256, "size": len(file.data), "pointerSize": 134}
    return entry
