"""A local stand-in for the Hugging Face hub, enough for huggingface_hub's create_repo, model_info and upload_folder.

It answers what those calls send (read from huggingface_hub's hf_api.py, _commit_api.py and _upload_pipeline.py):
    POST /api/repos/create                          {"name", "organization", "visibility"} -> {"url"}; 409 if it exists
    GET  /api/models/NS/NAME[/revision/REV]         {"id", "sha", "private"}
    POST /api/validate-yaml                         the model card's front matter: always fine
    POST /api/models/NS/NAME/preupload/REV          every file "regular", so its bytes come inline in the commit
    POST /api/models/NS/NAME/commit/REV             NDJSON: a header line, then {"key": "file", "value":
                                                    {"path", "content" (base64), "encoding"}} per file
    GET  /api/whoami-v2                             the user "user"
Anything else is answered 404 and kept in `unexpected`. With `refuse = 401` (or any status) every request is
answered that way, as the hub answers a bad token.

Use the `hub_server` fixture (import it into the test module): it yields a running FakeHub and stops it after."""

import base64
import http.server
import json
import re
import threading

import pytest
from conftest import serve_locally

USER = "user"  # the namespace a bare NAME lands in, as the hub puts it under the token's owner
REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (method, path pattern, FakeHub method)
    ("POST", r"/api/repos/create", "create"),
    ("GET", REPO + r"(/revision/[^/]+)?", "info"),
    ("POST", r"/api/validate-yaml", "validate"),
    ("POST", REPO + r"/preupload/[^/]+", "preupload"),
    ("POST", REPO + r"/commit/[^/]+", "commit"),
    ("GET", r"/api/whoami-v2", "whoami"),
]


class FakeHub:
    """Records every request (`requests`: method, path, Authorization header) and every repo (`repos`: repo id ->
    {"private", "files": {path: bytes}, "commits": [summary]}). Set `refuse` to a status to refuse everything."""

    def __init__(self):
        self.requests, self.unexpected, self.repos, self.refuse = [], [], {}, None
        self.lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.handle(self)

            def do_POST(self):
                hub.handle(self)

        self.httpd, self.url = serve_locally(Handler)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def use_in_this_process(self, monkeypatch):
        """Point an already imported huggingface_hub here, for a test that pushes without a subprocess.

        The library reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import (tests/conftest.py sets HF_HUB_OFFLINE=1
        first), into module constants that it looks up again on each use: HfApi() takes ENDPOINT when it is made,
        every request checks HF_HUB_OFFLINE. Two more keep the push inside the test: telemetry off (it would fetch an
        "agent harness" list from the endpoint and cache it in the real HF_HOME) and xet off (its session writes
        logs into the real HF_HOME; the single-commit upload it falls back to sends the same preupload and commit).
        A child process given HF_ENDPOINT (see tests/test_hub.py) needs none of this."""
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", self.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)

    @property
    def authorizations(self):
        return {request["authorization"] for request in self.requests}

    def files(self, repo_id):
        return self.repos[repo_id]["files"]

    # ---- the exchange

    def handle(self, request):
        path = request.path.split("?")[0]
        body = request.rfile.read(int(request.headers.get("Content-Length", 0)))
        with self.lock:
            self.requests.append({"method": request.command, "path": path,
                                  "authorization": request.headers.get("Authorization")})
            if self.refuse:
                status, answer = self.refuse, {"error": "Invalid credentials in Authorization header"}
            else:
                status, answer = self.route(request.command, path, body)
        data = json.dumps(answer).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        if status >= 400 and "error" in answer:
            request.send_header("X-Error-Message", answer["error"])
        request.end_headers()
        request.wfile.write(data)

    def route(self, method, path, body):
        for route_method, pattern, name in ROUTES:
            found = re.fullmatch(pattern, path)
            if method == route_method and found:
                return getattr(self, name)(body, **found.groupdict())
        self.unexpected.append((method, path))
        return 404, {"error": f"the fake hub does not answer {method} {path}"}

    def create(self, body):
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = {"private": payload.get("visibility") == "private", "files": {}, "commits": []}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def info(self, body, repo):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        return 200, {"id": repo, "sha": "0" * 40, "private": self.repos[repo]["private"]}

    def validate(self, body):
        return 200, {"errors": [], "warnings": []}

    def preupload(self, body, repo):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [{"path": file["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for file in json.loads(body)["files"]]
        return 200, {"files": files, "commitOid": "0" * 40}

    def commit(self, body, repo):
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                self.unexpected.append(("commit line", line["key"]))
                return 400, {"error": f"the fake hub only takes inline base64 files, not {line['key']}"}
            self.repos[repo]["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        self.repos[repo]["commits"].append(lines[0]["value"]["summary"])
        oid = f"{len(self.repos[repo]['commits']):040x}"
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}"}

    def whoami(self, body):
        return 200, {"type": "user", "name": USER}


@pytest.fixture
def hub_server():
    """A running FakeHub on 127.0.0.1, stopped at the end of the test."""
    hub = FakeHub()
    yield hub
    hub.stop()
