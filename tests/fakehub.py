"""A stand-in for the Hugging Face Hub on 127.0.0.1, for testing repo ids without a network.

It answers what huggingface_hub (2.x: `hf_hub_download`, `get_safetensors_metadata`) and
ct-convert's own range reads ask when `HF_ENDPOINT` points at it: `HEAD`/`GET
/{repo}/resolve/{revision}/{path}` with `X-Repo-Commit`, `ETag` and `Content-Length`, and `Range`
requests answered `206` with `Content-Range`; 404s carry the `X-Error-Code` the client maps to
RepositoryNotFoundError / RevisionNotFoundError / EntryNotFoundError. Every request is logged with
the byte range it was served, so a test can assert what was (not) downloaded. `fault` makes a file
of one repo misbehave: "truncate" closes the connection halfway through the body, "stall" never
answers (until `release` is set).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


@dataclass
class Served:
    method: str
    repo: str
    path: str  # the file inside the repo
    start: int = 0
    stop: int = 0  # bytes [start, stop) of the file were sent
    ref: str = ""  # the revision the request named


@dataclass
class FakeHub:
    # repo id -> ref (branch, tag or commit) -> (commit, {path: bytes})
    repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    # repo id -> (kind, file, from_byte): requests of that file whose range starts at or after
    # from_byte get the fault, "truncate" or "stall"
    fault: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def add(self, repo: str, ref: str, commit: str, files: dict[str, bytes]) -> None:
        refs = self.repos.setdefault(repo, {})
        refs[ref] = refs[commit] = (commit, files)

    def served(self, repo: str, path: str) -> list[Served]:
        """The GETs of one repo file that sent bytes."""
        return [s for s in self.log if s.repo == repo and s.path == path and s.method == "GET"]


def serve(hub: FakeHub):
    """Start the server in a thread; returns (server, "http://127.0.0.1:PORT")."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._route(body=False)

        def do_GET(self):
            self._route(body=True)

        def _route(self, body: bool):
            # the client quotes a revision's slashes (refs/pr/1): split first, then unquote
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
            if m:
                return self._resolve(unquote(m[1]), unquote(m[2]), unquote(m[3]), body)
            self._error(404, "EntryNotFound", body)

        def _lookup(self, repo: str, ref: str, body: bool):
            if repo not in hub.repos:
                self._error(404, "RepoNotFound", body)
                return None
            if ref not in hub.repos[repo]:
                self._error(404, "RevisionNotFound", body)
                return None
            return hub.repos[repo][ref]

        def _resolve(self, repo: str, ref: str, name: str, body: bool):
            found = self._lookup(repo, ref, body)
            if not found:
                return
            commit, files = found
            if name not in files:
                return self._error(404, "EntryNotFound", body, commit)
            data = files[name]
            start, stop, status = 0, len(data), 200
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if rng:
                start = int(rng[1])
                stop = min(len(data), int(rng[2]) + 1) if rng[2] else len(data)
                status = 206
            kind, file, from_byte = hub.fault.get(repo, ("", "", 0))
            fault = kind if file == name and start >= from_byte else None
            if fault == "stall":
                hub.log.append(Served(self.command, repo, name, ref=ref))
                hub.release.wait()
                return
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(stop - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
            self.end_headers()
            if not body:
                hub.log.append(Served("HEAD", repo, name, ref=ref))
                return
            if fault == "truncate":
                stop = start + (stop - start) // 2
                self.close_connection = True
            self.wfile.write(data[start:stop])
            hub.log.append(Served("GET", repo, name, start, stop, ref))

        def _error(self, status: int, code: str, body: bool, commit: str | None = None):
            raw = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if body:
                self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"

