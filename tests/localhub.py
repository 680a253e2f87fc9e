"""A Hugging Face Hub stand-in on 127.0.0.1 (port 0) for tests that cannot reach the real hub.

It answers the two requests ``huggingface_hub.hf_hub_download`` makes for a file, ``HEAD`` and ``GET
/{org}/{repo}/resolve/{revision}/{path}`` (headers ``X-Repo-Commit``, ``ETag``, ``Content-Length``; 404 with
``X-Error-Code: EntryNotFound`` for missing files), so the real client fills a real cache (``blobs/``,
``snapshots/<commit>/``, ``refs/<revision>``) exactly as a download from huggingface.co does; and serves plain
files under ``/files/<name>`` for URL sources (torch.hub). Point the client at it with ``HF_ENDPOINT``.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path


class LocalHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo_id, revision) -> {path: bytes}
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, with_body: bool):
                hub.requests.append(f"{self.command} {self.path}")
                data, commit = hub.lookup(self.path.split("?")[0])
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if with_body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_repo(self, repo_id: str, directory: str | Path, revision: str = "main") -> None:
        """Publish every file of ``directory`` as ``repo_id`` at ``revision``."""
        directory = Path(directory)
        self.repos[(repo_id, revision)] = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}

    def add_file(self, name: str, path: str | Path) -> str:
        self.files[name] = Path(path).read_bytes()
        return f"{self.url}/files/{name}"

    @staticmethod
    def commit_of(repo_id: str, revision: str) -> str:
        return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()

    def lookup(self, path: str) -> tuple[bytes | None, str | None]:
        parts = path.strip("/").split("/")
        if parts[0] == "files" and len(parts) == 2:
            return self.files.get(parts[1]), None
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            files = self.repos.get((repo_id, revision))
            if files is not None:
                return files.get(name), self.commit_of(repo_id, revision)
        return None, None

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
