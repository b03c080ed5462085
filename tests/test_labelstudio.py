"""The Label Studio round trip against a real server: a review queue exported as tasks, a project made through
`label-studio-sdk`, corrections submitted through the API as a reviewer would, the export imported back as label
files, and the rebuilt dataset holding the corrections with a card that counts them.

The server (`label-studio`, SQLite, localhost) lives in its own virtual environment, .cache/label-studio, which
scripts/install.sh makes: its pins (numpy, Django, opencv) are not the project's. The test skips only when that
binary is missing; CI runs install.sh first, so there it is present.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from avlabel.core import schema
from avlabel.core.layouts import CAMERA_SUFFIX
from avlabel.demo import synthetic
from avlabel.hub.labelstudio import export_tasks, label_to_results
from eval_labels import load_label_file

REPO = Path(__file__).resolve().parents[1]
SERVER = Path(os.environ.get("LABEL_STUDIO_BIN", REPO / ".cache" / "label-studio" / "bin" / "label-studio"))
TOKEN = "avlabel-review-test-token"
REVIEWER = ("--username", "reviewer@example.com", "--password", "review-pass-1234", "--user-token", TOKEN,
            "--enable-legacy-api-token")
# a data folder whose database is migrated and holds the reviewer, made once per server venv (a new server
# version starts from a new one): migrating an empty database is 30 of a first start's 35 s here
MIGRATED = SERVER.parents[1] / "avlabel-test-data"
CLOSED = list(schema.CLOSED_FIELD_NAMES)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Six synthetic clips in the recipe layout; three keep their labels, three are left for the model."""
    root = tmp_path_factory.mktemp("ls_raw")
    ids = synthetic.generate(root, 6, seed=5, width=64, height=36, seconds=1.0, fps=4, workers=1, progress=False)
    truth = {i: load_label_file(root / "metas" / f"{i}.label.json") for i in ids}
    for clip_id in ids[3:]:
        (root / "metas" / f"{clip_id}.label.json").unlink()
    return root, truth, ids[3:]


def _migrated_copy(data: Path, env: dict) -> None:
    """Fill `data` with a copy of MIGRATED, made first if need be (`label-studio init`, whole or not at all)."""
    if not MIGRATED.is_dir():
        building = Path(tempfile.mkdtemp(prefix="building-", dir=MIGRATED.parent))
        made = subprocess.run([str(SERVER), "init", "--data-dir", str(building), *REVIEWER], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        if made.returncode != 0:
            shutil.rmtree(building)
            pytest.fail(f"label-studio init failed: {made.stdout[-2000:]}{made.stderr[-2000:]}")
        building.rename(MIGRATED)
    shutil.copytree(MIGRATED, data, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def label_studio(media, tmp_path_factory):
    """A Label Studio server on localhost with one user and a legacy API token, serving the clips as local files."""
    if not SERVER.is_file():
        pytest.skip(f"Label Studio server not installed ({SERVER} missing): run scripts/install.sh")
    root = media[0]
    data = tmp_path_factory.mktemp("ls_data")
    port = _free_port()
    env = {**os.environ, "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root)}
    env.pop("PYTHONPATH", None)  # the server's own venv, not this checkout
    _migrated_copy(data, env)
    log = open(data / "server.log", "w")
    server = subprocess.Popen(
        [str(SERVER), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
         *REVIEWER],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + 420  # seconds from the migrated copy; a busy machine can take minutes
        while True:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or too busy migrating to answer
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Label Studio did not start: {(data / 'server.log').read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def _model_run(folder: Path, root: Path, truth: dict, clip_ids: list[str]) -> Path:
    """The model's captions of the unlabelled clips: clip n gets its first n closed fields wrong."""
    folder.mkdir()
    lines = []
    for n, clip_id in enumerate(clip_ids):
        answer = dict(truth[clip_id])
        for name in CLOSED[:n]:
            spec = schema.FIELDS_BY_NAME[name]
            answer[name] = next(c for c in spec.choices if c != str(answer[name])) if spec.kind != "multi_category" \
                else [c for c in spec.choices if c not in (answer[name] or [])][:1]
        confidence = {name: (0.3 if name in CLOSED[:n] else 0.9) for name in CLOSED}
        lines.append(json.dumps({"clip_id": clip_id, "video": str(root / "videos" / f"{clip_id}{CAMERA_SUFFIX}.mp4"),
                                 "label": json.loads(schema.label_to_json(schema.normalize_label(answer))),
                                 "valid": True, "status": "ok", "confidence": confidence,
                                 "clip_confidence": min(confidence.values())}) + "\n")
    (folder / "captions.jsonl").write_text("".join(lines))
    return folder


@pytest.mark.slow
def test_round_trip_through_a_real_label_studio(media, label_studio, tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq
    import requests
    from label_studio_sdk import LabelStudio

    from avlabel.cli import main as avlabel
    from avlabel.data_builder.build import BuildArguments, build

    root, truth, unlabelled = media
    first = build(BuildArguments(input=str(root), output_dir=str(tmp_path / "dataset"), test_size=0, num_proc=1))
    assert first.num_rows == 3

    # a token the server refuses: one line, no project
    run = _model_run(tmp_path / "run", root, truth, unlabelled)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-token")
    with pytest.raises(SystemExit) as refused:
        avlabel(["review", "--captions", str(run), "--budget", "100%", "--label_studio", label_studio])
    message = capsys.readouterr().err.strip()
    assert refused.value.code == 1 and "refused the access token in LABEL_STUDIO_API_KEY" in message, message
    assert len(message.splitlines()) == 1

    # clips the server may not serve (outside its document root): one line, and no half-made project left
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    client = LabelStudio(base_url=label_studio, api_key=TOKEN)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = json.loads((run / "captions.jsonl").read_text().splitlines()[0])
    outside["video"] = str(shutil.copy(outside["video"], elsewhere))
    (elsewhere / "captions.jsonl").write_text(json.dumps(outside) + "\n")
    with pytest.raises(SystemExit) as refused:
        avlabel(["review", "--captions", str(elsewhere), "--budget", "1", "--label_studio", label_studio])
    message = capsys.readouterr().err.strip()
    assert refused.value.code == 1 and "making the review project failed, HTTP 400" in message, message
    assert list(client.projects.list()) == []

    # out: the command chooses the queue and makes the project on the server
    queue = avlabel(["review", "--captions", str(run), "--budget", "100%", "--media_root", str(root),
                     "--label_studio", label_studio])
    assert [c.clip_id for c in queue.chosen] == unlabelled[::-1]  # most wrong fields first
    (project,) = [p.id for p in client.projects.list()]
    assert f"Label Studio project {project}: {label_studio}/projects/{project}/" in capsys.readouterr().out
    served = list(client.tasks.list(project=project, fields="all"))
    assert sorted(t.data["clip_id"] for t in served) == sorted(unlabelled)
    for task in served:  # the reviewer sees the clip and the model's scored answer, and submits the truth
        clip_id = task.data["clip_id"]
        video = requests.get(label_studio + task.data["video"], headers={"Authorization": f"Token {TOKEN}"}, timeout=30)
        assert video.status_code == 200, video.text[:500]
        assert video.content == (root / "videos" / f"{clip_id}{CAMERA_SUFFIX}.mp4").read_bytes()
        (prediction,) = client.predictions.list(task=task.id)
        assert prediction.score == (0.3 if unlabelled.index(clip_id) else 0.9)  # the clip's lowest field confidence
        scores = {item["from_name"]: item.get("score") for item in prediction.result}  # closed fields carry one
        assert scores["weather"] == (0.3 if unlabelled.index(clip_id) else 0.9)
        client.annotations.create(id=task.id, result=label_to_results(truth[clip_id]), was_cancelled=False)

    # back: the command reads the project's export from the server and writes label files
    imported = avlabel(["review", "--label_studio", label_studio, "--project", str(project), "--labels_dir", str(root)])
    assert not imported.problems and len(imported.written) == 3
    assert imported.corrected_fields == 0 + 1 + 2
    assert f"Run the build of {root} again" in capsys.readouterr().out  # the folder the dataset is built from
    # the same export, downloaded as a file, imports the same way
    export = tmp_path / "export.json"
    export.write_text(json.dumps(export_tasks(client, project)))
    again = avlabel(["review", "--annotations", str(export), "--labels_dir", str(tmp_path / "again")])
    assert [p.name for p in again.written] == [p.name for p in imported.written]
    assert "holds only these labels, so a build of it would hold only these clips" in capsys.readouterr().out

    second = build(BuildArguments(input=str(root), output_dir=str(tmp_path / "dataset"), test_size=0, num_proc=1))
    assert second.num_rows == 6 and not second.problems
    rows = pq.read_table(tmp_path / "dataset" / "train" / "metadata.parquet").to_pylist()
    labels = {row["clip_id"]: schema.row_to_label(row) for row in rows}
    assert labels == truth  # the corrections, not the model's answers, are in the dataset
    reviewed = {row["clip_id"]: json.loads(row["extra"])["review"] for row in rows if row["extra"]}
    assert set(reviewed) == set(unlabelled) and reviewed[unlabelled[2]]["corrected"] == CLOSED[:2]
    card = (tmp_path / "dataset" / "README.md").read_text()
    assert "3 label(s) came from review" in card and "corrected 3 field(s)" in card
