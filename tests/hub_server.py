"""An in-memory server that speaks the part of the Hugging Face Hub protocol our clients use,
and refuses what the real Hub refuses.

No package on the registries runs a writable Hub offline (see STACK_NOTES.md), so the tests
start this one on 127.0.0.1 and point the real `huggingface_hub`, `datasets`, `transformers`,
`peft` and `evaluate` clients at it through `HF_ENDPOINT`. It keeps git-like history (commits,
branches, pull-request refs, blob ids, LFS objects uploaded through the LFS batch protocol) for
model, dataset and Space repos (an `evaluate` metric is a Space).

What it refuses, each with the real Hub's status code and error shape (`{"error": message}` and
the `X-Error-Message` header, plus `X-Error-Code` where the Hub sends one):

- 401: a token the Hub does not know, on any route ("Invalid credentials in Authorization
  header"); a write without a token.
- 403: creating or deleting a repo in another user's namespace ("You don't have the rights to
  create a model under the namespace ..."); committing to another user's repo without
  `create_pr` ("Forbidden: pass `create_pr=1` as a query parameter to create a Pull Request").
  The token decides the user; `create_pr=1` opens `refs/pr/N` from main and leaves main alone.
- 404: a missing repo, or a private repo of another user (`RepoNotFound`); a missing revision
  (`RevisionNotFound`) or file (`EntryNotFound`).
- 409: creating a repo or branch that exists.
- 400 on commit, the Hub's pre-receive checks: a binary file (a NUL byte in its first 8,000
  bytes, git's test) or a file over 10 MiB committed as a regular file, not through LFS/Xet; a
  folder left with more than 10,000 entries; a repository left with more than 100,000 files; a
  commit of more than 1,000 files; card metadata that validate-yaml refuses.
- 400 from validate-yaml (and on commit): a `license` that is not a Hub license id, `configs`
  that is not a list of configs, a broken `model-index`, a Space `sdk` the Hub does not run.
- 413: paths-info for more than 1,000 paths ("too many parameters").
- 422: a commit naming an LFS object that was never uploaded.

Sources: the folder refusal and its wording are the Hub's as quoted in huggingface/datasets#7956;
the binary-file refusal is its pre-receive hook's (huggingface_hub#1404, xet-core#569); license
ids are hub-docs' repositories-licenses.md; the 401/403/404 shapes are what huggingface_hub's
`hf_raise_for_status` reads; the paths-info bound is huggingface_hub#1503. The Hub documents no
hard number of files per commit (it advises under 100; huggingface_hub's own multi-commit upload
makes at most 1,000) and documents 100,000 files per repository as a recommendation: those two
bounds are this server's, answered like the other pre-receive refusals.

Every request is recorded in `HubServer.requests`, what every commit carried in
`HubServer.commits`, and every token sent in `HubServer.tokens`, so tests can assert what was,
and was not, sent.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER, TOKEN = "tester", "hf_test_token_for_the_local_hub"
OTHER_USER, OTHER_TOKEN = "someone-else", "hf_token_of_someone_else"
# The patterns the Hub writes into a new repo's .gitattributes (the ones that matter here).
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.bin", "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.npz",
        "*.arrow", "*.parquet", "*.mp4", "*.avi", "*.mkv", "*.webm", "*.png", "*.jpg", "*.jpeg",
        "*.zip", "*.tar", "*.gz", "*.zst", "*tfevents*",
    )
)
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS whatever their name
BINARY_SNIFF = 8000  # git calls a blob binary when a NUL byte is in its first 8,000 bytes
MAX_FOLDER_ENTRIES = 10_000
MAX_REPO_FILES = 100_000
MAX_COMMIT_FILES = 1_000
MAX_PATHS_INFO = 1_000
SPACE_SDKS = ("gradio", "streamlit", "docker", "static")
# hub-docs/docs/hub/repositories-licenses.md
LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1
lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl
lgpl-lr deepfloyd-if-license llama2 gemma unknown other
""".split())
YAML_BLOCK = re.compile(r"\A\s*---[\n\r]+([\S\s]*?)[\n\r]+---([\n\r]|\Z)")
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")  # ISO 639: "en", "fra"; not "en-US", "EN", or YAML's `no` (false)
REPO_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """The git blob id: of the pointer file for LFS files, as in git."""
        return git_blob_oid(self.pointer if self.lfs else self.data)

    def entry(self, path: str) -> dict:
        out = {"type": "file", "path": path, "oid": self.oid, "size": len(self.data)}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return out


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch name or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    created: str = ""
    discussions: int = 0  # pull requests opened, numbered like the Hub's discussions

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        revision = revision.removeprefix("refs/heads/")
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


@dataclass
class CommitRecord:
    """What one accepted commit carried: the paths it added or changed and the paths it deleted."""

    repo_type: str
    repo_id: str
    ref: str
    added: list[str]
    deleted: list[str]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def card_metadata(readme: bytes | None) -> dict | None:
    if readme is None:
        return None
    match = YAML_BLOCK.search(readme.decode("utf-8", errors="replace"))
    if not match:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


def _strings(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _config_errors(configs) -> list[str]:
    if not isinstance(configs, list):
        return ['"configs" must be an array']
    errors = []
    for i, config in enumerate(configs):
        if not isinstance(config, dict) or not isinstance(config.get("config_name"), str):
            errors.append(f'"configs[{i}].config_name" is required')
            continue
        files = config.get("data_files")
        if files is None or _strings(files):
            continue
        if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("split"), str) and _strings(f.get("path")) for f in files
        ):
            errors.append(f'"configs[{i}].data_files" must be a path, a list of paths or a list of {{split, path}}')
    return errors


def _model_index_errors(index) -> list[str]:
    if not isinstance(index, list):
        return ['"model-index" must be an array']
    errors = []
    for i, entry in enumerate(index):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f'"model-index[{i}].name" is required')
            continue
        for j, result in enumerate(entry.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance((result.get("task") or {}).get("type"), str):
                errors.append(f'"{where}.task.type" is required')
            dataset = result.get("dataset") or {}
            if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                errors.append(f'"{where}.dataset" needs "type" and "name"')
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{where}.metrics" must be a non-empty array')
                continue
            for k, metric in enumerate(metrics):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                    errors.append(f'"{where}.metrics[{k}]" needs "type" and "value"')
    return errors


def _language_errors(language, repo_type: str) -> list[str]:
    """A dataset's `language` is a list of codes; a model card may give one code as a string."""
    if isinstance(language, str) and repo_type != "dataset":
        language = [language]
    if not isinstance(language, list):
        return ['"language" must be an array of ISO 639 codes']
    return [f'"language[{i}]" must be a lowercase ISO 639 code of 2 or 3 letters, got {code!r}'
            for i, code in enumerate(language) if not (isinstance(code, str) and LANGUAGE_CODE.fullmatch(code))]


def metadata_errors(content: str, repo_type: str = "model") -> list[str]:
    """What the Hub's validate-yaml refuses in a card of `repo_type` and that a card writer can get wrong."""
    match = YAML_BLOCK.search(content)
    if not match:
        return []
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"YAML is not valid: {err}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    license = data.get("license")
    # a dataset may name several licenses; a model or a Space one
    if license is not None and not all(
        isinstance(v, str) and v in LICENSES
        for v in (license if isinstance(license, list) and repo_type == "dataset" else [license])
    ):
        errors.append(f'"license" must be one of the Hub\'s license ids '
                      f'(https://huggingface.co/docs/hub/repositories-licenses), got {license!r}')
    for key in ("base_model", "datasets", "tags"):
        value = data.get(key)
        if value is not None and not _strings(value):
            errors.append(f'"{key}" must be a string or an array of strings')
    if "language" in data:
        errors += _language_errors(data["language"], repo_type)
    for key in ("task_categories", "task_ids"):  # huggingface/datasets#5137: a bare string is refused
        if key in data and not (isinstance(data[key], list) and all(isinstance(v, str) for v in data[key])):
            errors.append(f'"{key}" must be an array of strings')
    if "configs" in data:
        errors += _config_errors(data["configs"])
    info = data.get("dataset_info")
    if info is not None and not (isinstance(info, dict) or (isinstance(info, list) and all(isinstance(i, dict) for i in info))):
        errors.append('"dataset_info" must be an object or an array of objects')
    if "model-index" in data:
        errors += _model_index_errors(data["model-index"])
    if repo_type == "space" and "sdk" in data and data["sdk"] not in SPACE_SDKS:
        errors.append(f'"sdk" must be one of [{", ".join(SPACE_SDKS)}]')
    return errors


def _too_full_folders(files) -> list[str]:
    """Folders (as the Hub names them, "/a/b/") holding more than MAX_FOLDER_ENTRIES files and folders."""
    entries: dict[str, set[str]] = defaultdict(set)
    for path in files:
        parts = path.split("/")
        for depth in range(len(parts)):
            entries["/".join(parts[:depth])].add(parts[depth])
    return sorted(f"/{folder}/" if folder else "/" for folder, names in entries.items() if len(names) > MAX_FOLDER_ENTRIES)


class HubState:
    """Repos, their commits, and the LFS object store, guarded by one lock."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self._counter = 0

    def repo(self, repo_type: str, repo_id: str, viewer: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and repo.namespace != viewer):
            raise HubError(404, f"Repository Not Found: {REPO_PREFIX[repo_type]}{repo_id}", "RepoNotFound")
        return repo

    def commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def new_commit(self, repo: Repo, parent: Commit | None, title: str, files: dict[str, Blob]) -> Commit:
        self._counter += 1
        oid = hashlib.sha1(f"{repo.type}/{repo.id}/{self._counter}/{time.time_ns()}".encode()).hexdigest()
        commit = Commit(oid, parent.oid if parent else None, title, files, _now())
        repo.commits[oid] = commit
        return commit

    def create(self, repo_type: str, repo_id: str, private: bool = False, sdk: str | None = None) -> Repo:
        repo = Repo(repo_type, repo_id, private, created=_now())
        files = {".gitattributes": Blob(GITATTRIBUTES.encode(), False)}
        if repo_type == "space":  # the Hub starts a Space with a card naming its SDK
            title = repo_id.split("/")[1]
            files["README.md"] = Blob(f"---\ntitle: {title}\nsdk: {sdk}\n---\n".encode(), False)
        repo.branches["main"] = self.new_commit(repo, None, "initial commit", files).oid
        self.repos[(repo_type, repo_id)] = repo
        return repo


def _is_utf8(sample: bytes) -> bool:
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:  # a sample may end inside a multi-byte character
        return err.start >= len(sample) - 3 and err.reason == "unexpected end of data"
    return True


def _lfs_patterns(files: dict[str, Blob]) -> list[str]:
    attributes = files.get(".gitattributes")
    if attributes is None:
        return []
    return [line.split()[0] for line in attributes.data.decode().splitlines() if "filter=lfs" in line]


def _flag(value: list[str] | None) -> bool:
    return bool(value) and value[0].lower() in ("1", "true")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer
    user: str | None = None  # whom the request's token names

    def log_message(self, format, *args):  # the default handler writes every request to stderr
        pass

    # ----------------------------------------------------------------- plumbing

    def _body(self) -> bytes:
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
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes | str | dict | list = b"", headers: dict | None = None, head=False):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        self.server.requests.append((method, url.path))
        try:
            authorization = self.headers.get("Authorization", "")
            self.user = None
            if authorization.startswith("Bearer "):
                token = authorization.removeprefix("Bearer ")
                self.server.tokens.add(token)
                self.user = self.server.users.get(token)
                if self.user is None:  # the Hub answers an unknown token so on every route, reads included
                    raise HubError(401, "Invalid credentials in Authorization header")
            for pattern, verb, handler in ROUTES:
                match = pattern.fullmatch(url.path)
                if match and verb == method.replace("HEAD", "GET"):
                    with self.server.state.lock:
                        groups = [unquote(g) if g is not None else None for g in match.groups()]
                        return handler(self, body, *groups, head=(method == "HEAD"))
            self.server.unhandled.append((method, self.path))
            raise HubError(404, f"test Hub has no route for {method} {url.path}")
        except HubError as err:
            headers = {"X-Error-Message": err.message.replace("\n", " ")}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message, **err.extra}, headers, head=(method == "HEAD"))

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _require_auth(self) -> str:
        if self.user is None:
            raise HubError(401, "Invalid username or password.")
        return self.user

    def _repo(self, kind: str, repo_id: str) -> Repo:
        return self.server.state.repo(kind.rstrip("s"), repo_id, self.user)

    def _url(self, repo: Repo) -> str:
        return f"{self.server.endpoint}/{REPO_PREFIX[repo.type]}{repo.id}"

    # ----------------------------------------------------------------- routes

    def whoami(self, body, head=False):
        user = self._require_auth()
        self._send(200, {"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
                         "fullname": user.title(), "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def agent_harnesses(self, body, head=False):
        # huggingface_hub asks the Hub which AI-agent harnesses to detect for its user agent; none here
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def create_repo(self, body, head=False):
        user = self._require_auth()
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        repo_id = f"{namespace}/{payload['name']}"
        state = self.server.state
        if (repo_type, repo_id) in state.repos:
            url = self._url(state.repos[(repo_type, repo_id)])
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        if repo_type == "space" and payload.get("sdk") not in SPACE_SDKS:
            raise HubError(400, f'"sdk" must be one of [{", ".join(SPACE_SDKS)}]')
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        repo = state.create(repo_type, repo_id, private, payload.get("sdk"))
        self._send(200, {"url": self._url(repo), "name": repo_id, "id": repo_id})

    def delete_repo(self, body, head=False):
        user = self._require_auth()
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f'You don\'t have the rights to delete repos under the namespace "{namespace}"')
        key = (payload.get("type") or "model", f"{namespace}/{payload['name']}")
        if self.server.state.repos.pop(key, None) is None:
            raise HubError(404, f"Repository Not Found: {key[1]}", "RepoNotFound")
        self._send(200, {})

    def validate_yaml(self, body, head=False):
        payload = json.loads(body)
        errors = metadata_errors(payload.get("content", ""), payload.get("repoType") or "model")
        if "text/plain" in self.headers.get("Accept", ""):  # what RepoCard.validate asks for
            self._send(400 if errors else 200, "\n".join(errors), {"Content-Type": "text/plain"})
        else:
            self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

    def repo_info(self, body, kind, repo_id, revision="main", head=False):
        repo = self._repo(kind, repo_id)
        commit = self.server.state.commit(repo, revision)
        card = card_metadata(commit.files["README.md"].data if "README.md" in commit.files else None)
        info = {
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "author": repo.namespace,
            "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": list((card or {}).get("tags") or []),
            # siblings name the LFS hash "sha256" where tree entries call it "oid", as on the Hub
            "siblings": [{"rfilename": p, "size": len(b.data), "blobId": b.oid,
                          **({"lfs": {"sha256": b.sha256, "size": len(b.data), "pointerSize": len(b.pointer)}} if b.lfs else {})}
                         for p, b in sorted(commit.files.items())],
        }
        if card is not None:
            info["cardData"] = card
            if repo.type == "model" and "model-index" in card:
                info["model-index"] = card["model-index"]
        if repo.type == "model":
            info["modelId"] = repo.id
            info["pipeline_tag"] = (card or {}).get("pipeline_tag")
            info["library_name"] = (card or {}).get("library_name")
        if repo.type == "space":
            info["sdk"] = (card or {}).get("sdk")
        self._send(200, info)

    def refs(self, body, kind, repo_id, head=False):
        repo = self._repo(kind, repo_id)

        def ref(name, oid):
            return {"name": name, "ref": name if name.startswith("refs/") else f"refs/heads/{name}", "targetCommit": oid}

        out = {"branches": [ref(n, c) for n, c in repo.branches.items() if not n.startswith("refs/pr/")],
               "converts": [], "tags": []}
        if _flag(self.query.get("include_prs")):
            out["pullRequests"] = [ref(n, c) for n, c in repo.branches.items() if n.startswith("refs/pr/")]
        self._send(200, out)

    def commits(self, body, kind, repo_id, revision, head=False):
        repo = self._repo(kind, repo_id)
        commit, out = self.server.state.commit(repo, revision), []
        while commit is not None:
            out.append({"id": commit.oid, "title": commit.title, "message": commit.title,
                        "authors": [{"user": repo.namespace}], "date": commit.date})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send(200, out)

    def create_branch(self, body, kind, repo_id, branch, head=False):
        user = self._require_auth()
        repo = self._repo(kind, repo_id)
        if repo.namespace != user:
            raise HubError(403, "Forbidden: you cannot create a branch in this repo")
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        repo.branches[branch] = self.server.state.commit(repo, start).oid
        self._send(200, {})

    def tree(self, body, kind, repo_id, revision, path=None, head=False):
        path = path or ""
        repo = self._repo(kind, repo_id)
        files = self.server.state.commit(repo, revision).files
        recursive = _flag(self.query.get("recursive"))
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        entries, folders = [], set()
        for name, blob in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            if len(parts) == 1 or recursive:
                entries.append(blob.entry(name))
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
        entries += [{"type": "directory", "path": f, "oid": git_blob_oid(f.encode()), "size": 0} for f in sorted(folders)]
        self._send(200, entries)

    def paths_info(self, body, kind, repo_id, revision, head=False):
        repo = self._repo(kind, repo_id)
        files = self.server.state.commit(repo, revision).files
        form = parse_qs(body.decode()) if body and not body.lstrip().startswith(b"{") else json.loads(body or b"{}")
        paths = form.get("paths", [])
        if len(paths) > MAX_PATHS_INFO:
            raise HubError(413, "too many parameters")
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(files[path].entry(path))
            elif any(p.startswith(path + "/") for p in files):
                out.append({"type": "directory", "path": path, "oid": git_blob_oid(path.encode()), "size": 0})
        self._send(200, out)

    def preupload(self, body, kind, repo_id, revision, head=False):
        self._require_auth()
        repo = self._repo(kind, repo_id)
        commit = self.server.state.commit(repo, revision)
        patterns = _lfs_patterns(commit.files)
        out = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            binary = b"\0" in sample or not _is_utf8(sample)
            lfs = item["size"] >= LFS_THRESHOLD or binary or any(fnmatch.fnmatch(item["path"].split("/")[-1], p) for p in patterns)
            existing = commit.files.get(item["path"])
            remote_oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            out.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": remote_oid})
        self._send(200, {"files": out, "commitOid": commit.oid})

    def lfs_batch(self, body, kind, repo_id, head=False):
        self._require_auth()  # any user who can read the repo may upload objects, for a pull request
        self._repo(kind, repo_id)
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self.server.endpoint}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, body, oid, head=False):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match sha256 {oid}")
        self.server.state.lfs[oid] = body
        self._send(200, b"")

    def commit(self, body, kind, repo_id, revision, head=False):
        user = self._require_auth()
        state = self.server.state
        repo = self._repo(kind, repo_id)
        create_pr = _flag(self.query.get("create_pr"))
        if repo.namespace != user and not create_pr and not revision.startswith("refs/pr/"):
            raise HubError(403, "Forbidden: pass `create_pr=1` as a query parameter to create a Pull Request")
        if revision not in repo.branches:
            if revision in repo.commits:
                raise HubError(400, f"Cannot commit to a commit id ({revision}): name a branch")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent = repo.commits[repo.branches[revision]]
        ref = f"refs/pr/{repo.discussions + 1}" if create_pr else (
            revision if revision.startswith("refs/") else f"refs/heads/{revision}")
        files, title, added, deleted, regular = dict(parent.files), "", [], [], {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value["summary"]
                if value.get("parentCommit") not in (None, parent.oid) and not create_pr:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = regular[value["path"]] = Blob(base64.b64decode(value["content"]), False)
                added.append(value["path"])
            elif key == "lfsFile":
                data = state.lfs.get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob(data, True)
                added.append(value["path"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                deleted.append(value["path"])
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(folder)}
                deleted.append(folder)
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        self._pre_receive(repo, ref, files, regular, len(added) + len(deleted))
        new = state.new_commit(repo, parent, title, files)
        pr_url = None
        if create_pr:
            repo.discussions += 1
            repo.branches[ref] = new.oid
            pr_url = f"{self._url(repo)}/discussions/{repo.discussions}"
        else:
            repo.branches[revision] = new.oid
        self.server.commits.append(CommitRecord(repo.type, repo.id, ref, added, deleted))
        self._send(200, {"commitUrl": f"{self._url(repo)}/commit/{new.oid}", "commitOid": new.oid,
                         "pullRequestUrl": pr_url})

    def _pre_receive(self, repo: Repo, ref: str, files: dict[str, Blob], regular: dict[str, Blob], operations: int):
        """The checks the Hub runs before it accepts a commit; each refusal is a 400 as on the Hub."""
        if operations > MAX_COMMIT_FILES:
            raise HubError(400, f"Your commit holds {operations} file operations, more than the {MAX_COMMIT_FILES} "
                                "one commit may carry: split it into several commits")
        binary = sorted(p for p, b in regular.items() if b"\0" in b.data[:BINARY_SNIFF])
        if binary:
            raise HubError(400, "Your push was rejected because it contains binary files.\n"
                                "Please use https://huggingface.co/docs/hub/xet to store binary files.\n"
                                "Offending files:\n" + "".join(f"  - {p} (ref: {ref})\n" for p in binary))
        large = sorted(p for p, b in regular.items() if len(b.data) > LFS_THRESHOLD)
        if large:
            raise HubError(400, "Your push was rejected because it contains files larger than 10 MiB.\n"
                                "Please use https://huggingface.co/docs/hub/xet to store large files.\n"
                                "Offending files:\n" + "".join(f"  - {p} (ref: {ref})\n" for p in large))
        full = _too_full_folders(files)
        if full:
            raise HubError(400, "Your push was rejected because it contains too many files per directory. Each "
                                f"directory in your git repo can only contain up to {MAX_FOLDER_ENTRIES} files. "
                                f"Offending reference: {ref} Offending directories: {' '.join(full)}")
        if len(files) > MAX_REPO_FILES:
            raise HubError(400, f"Your push was rejected because the repository would hold {len(files)} files, more "
                                f"than the {MAX_REPO_FILES} a repository may hold: merge data into fewer files "
                                f"(Parquet shards). Offending reference: {ref}")
        if "README.md" in regular and (errors := metadata_errors(regular["README.md"].data.decode("utf-8", "replace"),
                                                                  repo.type)):
            raise HubError(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))

    def resolve(self, body, kind, repo_id, revision, path, head=False):
        repo = self.server.state.repo({"datasets/": "dataset", "spaces/": "space", "": "model"}[kind or ""], repo_id,
                                      self.user)
        commit = self.server.state.commit(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = blob.data
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.sha256 if blob.lfs else blob.oid}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Size": len(data), "X-Linked-Etag": f'"{blob.sha256}"'})
        status = 200
        byte_range = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if byte_range and data:
            start_s, end_s = byte_range.groups()
            if start_s:
                start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
            else:  # a suffix range: the last N bytes
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            if start >= len(data):
                raise HubError(416, "Requested range not satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, head=head)


_REPO = r"([\w.-]+/[\w.-]+)"
_KIND = r"(models|datasets|spaces)"
ROUTES = [
    (re.compile(p), verb, handler)
    for p, verb, handler in (
        (r"/api/whoami-v2", "GET", _Handler.whoami),
        (r"/api/agent-harnesses", "GET", _Handler.agent_harnesses),
        (r"/api/repos/create", "POST", _Handler.create_repo),
        (r"/api/repos/delete", "DELETE", _Handler.delete_repo),
        (r"/api/validate-yaml", "POST", _Handler.validate_yaml),
        (rf"/api/{_KIND}/{_REPO}/preupload/([^/]+)", "POST", _Handler.preupload),
        (rf"/api/{_KIND}/{_REPO}/commit/([^/]+)", "POST", _Handler.commit),
        (rf"/api/{_KIND}/{_REPO}/paths-info/([^/]+)", "POST", _Handler.paths_info),
        (rf"/api/{_KIND}/{_REPO}/branch/([^/]+)", "POST", _Handler.create_branch),
        (rf"/api/{_KIND}/{_REPO}/refs", "GET", _Handler.refs),
        (rf"/api/{_KIND}/{_REPO}/commits/([^/]+)", "GET", _Handler.commits),
        (rf"/api/{_KIND}/{_REPO}/tree/([^/]+)(?:/(.*))?", "GET", _Handler.tree),
        (rf"/api/{_KIND}/{_REPO}", "GET", _Handler.repo_info),
        (rf"/api/{_KIND}/{_REPO}/revision/([^/]+)", "GET", _Handler.repo_info),
        (rf"/(datasets/|spaces/)?{_REPO}\.git/info/lfs/objects/batch", "POST",
         lambda h, b, kind, repo_id, head=False: h.lfs_batch(b, (kind or "models/").rstrip("/"), repo_id)),
        (r"/_lfs/([0-9a-f]{64})", "PUT", _Handler.lfs_put),
        (rf"/(datasets/|spaces/)?{_REPO}/resolve/([^/]+)/(.+)", "GET", _Handler.resolve),
    )
]


class HubServer(ThreadingHTTPServer):
    """`with HubServer() as hub:` serves on 127.0.0.1 at `hub.endpoint` from a daemon thread.

    `users` maps each token the Hub knows to its user (default: `TOKEN` is `USER`, `OTHER_TOKEN`
    is `OTHER_USER`); a user may write only in the namespace of its own name.
    """

    daemon_threads = True
    request_queue_size = 64  # the LFS upload sends files from several threads at once

    def __init__(self, users: dict[str, str] | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.state = HubState()
        self.users = dict(users or {TOKEN: USER, OTHER_TOKEN: OTHER_USER})
        self.requests: list[tuple[str, str]] = []
        self.commits: list[CommitRecord] = []
        self.unhandled: list[tuple[str, str]] = []
        self.tokens: set[str] = set()  # every token a client sent
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision, for tests to inspect exactly what was pushed."""
        with self.state.lock:
            repo = self.state.repos[(repo_type, repo_id)]
            return {p: b.data for p, b in repo.resolve(revision).files.items()}

    def seed(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> None:
        """Commit `files` (as LFS objects) straight into the repo's main, creating it: a large repo in no time."""
        with self.state.lock:
            repo = self.state.repos.get((repo_type, repo_id)) or self.state.create(repo_type, repo_id)
            parent = repo.resolve("main")
            blobs = {**parent.files, **{p: Blob(data, True) for p, data in files.items()}}
            repo.branches["main"] = self.state.new_commit(repo, parent, "seed", blobs).oid


def point_clients_at(endpoint: str, monkeypatch, cache_dir) -> None:
    """Send huggingface_hub, datasets, transformers, peft and evaluate to `endpoint` for one test.

    The libraries read HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET and the cache folders
    into module constants at import, which happened long before a fixture runs; setting the
    environment alone changes nothing in this process. So the constants are patched where the
    clients read them at call time, and the environment is set too for subprocesses.
    """
    import datasets.config
    import evaluate.config
    import huggingface_hub.hf_api
    from huggingface_hub import constants

    cache_dir = str(cache_dir)
    # HF_MODULES_CACHE is for subprocesses only: evaluate imports its dynamic-modules package from
    # the first cache folder a process used. HF_UPDATE_DOWNLOAD_COUNTS: evaluate counts loads on S3.
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0", "HF_HUB_CACHE": f"{cache_dir}/hub", "HF_DATASETS_CACHE": f"{cache_dir}/datasets",
           "HF_MODULES_CACHE": f"{cache_dir}/modules", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # else binary uploads go to Xet storage
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    # module-level helpers (`huggingface_hub.file_exists`, used by peft) are methods of an
    # HfApi made at import, which copied the endpoint then
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"]))
    # evaluate loads a metric repo "ns/name" from the Space at {endpoint}/spaces/ns/name/resolve/...
    monkeypatch.setattr(evaluate.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(evaluate.config, "HUB_EVALUATE_URL", endpoint + "/spaces/{path}/resolve/{revision}/{name}")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", False)
    monkeypatch.setattr(evaluate.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
