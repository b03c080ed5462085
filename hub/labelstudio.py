"""Label Studio round trip: a review queue out as tasks, the reviewers' annotations back as label files.

Label Studio (https://labelstud.io) is the open-source annotation tool data teams already run. Out:
`labeling_config()` writes its XML labeling configuration from the schema (Choices for the closed fields,
several at once for the manoeuvre list, TextArea for free text, the clip in a Video tag), and
`queue_to_tasks()` turns `avlabel review`'s queue into tasks whose pre-annotation ("predictions") is the
model's answer, scored with its confidence, so a reviewer corrects rather than types. Back:
`import_annotations()` reads Label Studio's JSON export and writes each task's latest submitted annotation as
`metas/<id>.label.json` in the recipe layout (the clip linked under `videos/`), with a `review` key saying where
it came from and which fields the reviewer changed; the builder keeps that key in the `extra` column and the
dataset card counts those labels.

The file formats are Label Studio's; `connect`, `push_tasks` and `export_tasks` talk to a server through
`label-studio-sdk` (the `labelstudio` extra), so that `avlabel review --label_studio URL` makes the project and
`--project N` brings its annotations back without files passed by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from avlabel.core import schema
from avlabel.core.errors import one_line
from avlabel.core.files import link_or_copy
from avlabel.core.layouts import CAMERA_SUFFIX, LABEL_SUFFIX, clip_id_of, clip_id_problem, is_video
from avlabel.core.problems import Problem
from avlabel.extras import require

VIDEO_TAG = "video"  # the Video tag's name: every control labels it
REVIEW_KEY = "review"  # the key beyond the schema that marks a label as reviewed (kept in `extra`)
TOOL = "label-studio"
API_KEY_ENV = "LABEL_STUDIO_API_KEY"  # label-studio-sdk's own variable for the access token


# ----------------------------------------------------------------------------- out: config and tasks


def labeling_config() -> str:
    """The labeling configuration: one control per schema field, in schema order, named after it."""
    lines = ["<View>", f'  <Video name="{VIDEO_TAG}" value="$video"/>']
    for spec in schema.FIELDS:
        lines.append(f"  <Header value={quoteattr(f'{spec.name}: {spec.question}')}/>")
        required = "false" if spec.nullable else "true"
        if spec.kind == "text":
            lines.append(f'  <TextArea name="{spec.name}" toName="{VIDEO_TAG}" editable="true" maxSubmissions="1" '
                         f'rows="2" required="{required}" placeholder={quoteattr(spec.guidance)}/>')
            continue
        choice = "multiple" if spec.kind == "multi_category" else "single"
        lines.append(f'  <Choices name="{spec.name}" toName="{VIDEO_TAG}" choice="{choice}" showInline="true" '
                     f'required="{required}">')
        for value in spec.choices:
            hint = schema.DIFFICULTY_LEVELS[int(value)] if spec.kind == "difficulty" else None
            lines.append(f"    <Choice value={quoteattr(value)}" + (f" hint={quoteattr(hint)}" if hint else "") + "/>")
        lines.append("  </Choices>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"


def label_to_results(label: dict[str, Any], confidence: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """A label as Label Studio result items (one per answered field), each scored with its confidence."""
    results = []
    for spec in schema.FIELDS:
        if spec.name not in label or label[spec.name] is None:
            continue  # a null answer is an empty control
        value = label[spec.name]
        if spec.kind == "text":
            item = {"type": "textarea", "value": {"text": [value]}}
        else:
            values = value if spec.kind == "multi_category" else [value]
            item = {"type": "choices", "value": {"choices": [str(v) for v in values]}}
        item.update({"from_name": spec.name, "to_name": VIDEO_TAG})
        if confidence and spec.name in confidence:
            item["score"] = float(confidence[spec.name])
        results.append(item)
    return results


def results_to_label(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Label Studio result items back to a raw label (normalise with the schema): an empty control is null."""
    raw: dict[str, Any] = dict.fromkeys(schema.FIELD_NAMES)
    for item in results:
        name, value = item.get("from_name"), item.get("value") or {}
        spec = schema.FIELDS_BY_NAME.get(name)
        if spec is None:
            continue  # a control not generated from the schema (a team's own addition)
        if spec.kind == "text":
            raw[name] = "\n".join(value.get("text") or []) or None
        elif spec.kind == "multi_category":
            raw[name] = list(value.get("choices") or []) or None
        else:
            choices = value.get("choices") or []
            raw[name] = choices[0] if choices else None
    return raw


def video_url(path: str, media_url: str | None = None, media_root: str = "/") -> str:
    """Where Label Studio's player fetches a clip: under `media_url`, or Label Studio's local-files route."""
    relative = os.path.relpath(Path(path).resolve(), Path(media_root).resolve())
    if relative.split(os.sep)[0] == os.pardir:  # neither route serves a file above its root
        raise ValueError(f"clip {path} is not under --media_root {media_root}: give the folder that holds every clip "
                         "(Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, or the root --media_url serves)")
    if media_url:
        return media_url.rstrip("/") + "/" + quote(relative)
    return "/data/local-files/?d=" + quote(relative)


def queue_to_tasks(entries: list[dict[str, Any]], media_url: str | None = None, media_root: str = "/",
                   model_version: str = "avlabel") -> list[dict[str, Any]]:
    """One task per queue entry: the clip, its id and path, and the model's answer as a scored prediction."""
    tasks = []
    for entry in entries:
        video = entry.get("video") or ""
        data = {"video": video_url(video, media_url, media_root) if video else "", "clip_id": entry["clip_id"],
                "path": video, "review_reason": entry.get("reason", ""),
                # the model's answer again, as data: Label Studio's export names predictions only by id
                "model_label": entry.get("label") or {}}
        prediction = {"model_version": model_version, "result": label_to_results(entry.get("label") or {},
                                                                                 entry.get("confidence"))}
        if entry.get("clip_confidence") is not None:
            prediction["score"] = float(entry["clip_confidence"])
        tasks.append({"data": data, "predictions": [prediction]})
    return tasks


# ----------------------------------------------------------------------------- back: annotations to label files


@dataclass
class ImportResult:
    written: list[Path] = field(default_factory=list)  # label files written
    corrected_fields: int = 0  # fields the reviewers changed from the model's answer, over all written labels
    problems: list[Problem] = field(default_factory=list)  # tasks not imported, and why


def _submitted(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The task's submitted annotations (a skipped one, `was_cancelled`, is no answer)."""
    return [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]


def _when(annotation: dict[str, Any]) -> tuple[str, int]:
    """Sorts annotations by when they were last saved (ISO times sort as text), then by id."""
    return annotation.get("updated_at") or annotation.get("created_at") or "", annotation.get("id") or 0


def _store_video(source: str, videos: Path, clip_id: str) -> str | None:
    """Put the clip under videos/ as the recipe names it (a hardlink, else a copy) unless one is there."""
    if any(clip_id_of(p) == clip_id and is_video(p) for p in videos.glob(f"{clip_id}*")):
        return None
    path = Path(source)
    if not path.is_file():
        return f"its clip {source} is not a file; put it under {videos} as {clip_id}{CAMERA_SUFFIX}.mp4"
    target = videos / f"{clip_id}{CAMERA_SUFFIX}{path.suffix.lower()}"
    link_or_copy(path, target)
    return None


def _read_export(export: str | Path, where: str) -> Any:
    try:  # utf-8-sig: an export saved again by a Windows editor starts with a byte-order mark
        return json.loads(Path(export).read_text(encoding="utf-8-sig"))
    except OSError as err:
        raise ValueError(f"{where}: can't be read ({err.strerror}); give the path of the project's JSON export") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not a Label Studio JSON export (not UTF-8); export the project as JSON") from None
    except json.JSONDecodeError as err:  # a CSV export, or a download cut short
        raise ValueError(f"{where}: not a Label Studio JSON export ({schema.json_error_reason(err)}); export the "
                         "project as JSON") from None


def import_annotations(export: str | Path | list[dict[str, Any]], labels_dir: str | Path,
                       source: str = "export") -> ImportResult:
    """Write each clip's latest submitted annotation as a recipe-layout label file; returns what was written.
    `export`: the export file, or its tasks (`source` names them in problems).

    A task with no submitted annotation, or whose annotation the schema refuses, is reported, not written; so
    is every annotation of a clip older than its latest (a second annotation of the task, or the clip's task
    imported twice), and a task whose clip id can't be a file name.
    """
    where = str(export) if not isinstance(export, list) else source
    tasks = export if isinstance(export, list) else _read_export(export, where)
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise ValueError(f"{where}: not a Label Studio JSON export (expected a list of task objects); export the "
                         "project as JSON")
    if tasks and not any("data" in task for task in tasks) and any("clip_id" in task for task in tasks):
        raise ValueError(f"{where}: a JSON-MIN export (one flat object per annotation, without the annotations' "
                         "ids and times); export the project as JSON")
    result = ImportResult()
    answers_of: dict[str, list[tuple[dict, dict, str]]] = {}  # clip id -> its (annotation, task, name)
    for task in tasks:
        data = task.get("data") or {}
        clip_id = data.get("clip_id")
        name = f"{where}: task {task.get('id')}" + (f" (clip {clip_id})" if clip_id else "")
        submitted = _submitted(task)
        if not clip_id:
            result.problems.append(Problem(name, "read", "has no data.clip_id; not a task `avlabel review` exported"))
        elif (problem := clip_id_problem(clip_id)) is not None:
            result.problems.append(Problem(name, "read", f"{problem}; not a task `avlabel review` exported"))
        elif not submitted:
            skipped = bool(task.get("annotations"))
            result.problems.append(Problem(name, "read", "was skipped by every reviewer; submit an annotation in "
                                           "Label Studio to import it" if skipped else "has no submitted annotation yet"))
        else:
            answers_of.setdefault(clip_id, []).extend((annotation, task, name) for annotation in submitted)
    labels_dir = Path(labels_dir)
    (labels_dir / "metas").mkdir(parents=True, exist_ok=True)
    (labels_dir / "videos").mkdir(parents=True, exist_ok=True)
    for clip_id, answers in answers_of.items():
        answers.sort(key=lambda answer: _when(answer[0]), reverse=True)
        (annotation, task, name), older = answers[0], answers[1:]
        for old, _, old_name in older:
            result.problems.append(Problem(old_name, "superseded", f"annotation {old.get('id')} is older than "
                                           f"annotation {annotation.get('id')} of task {task.get('id')} for the same "
                                           "clip; the latest is imported"))
        data = task["data"]
        label, problems = schema.check_label(results_to_label(annotation.get("result") or []))
        if problems:
            detail = "; ".join(f"{field_name} {', '.join(msgs)}" for field_name, msgs in problems.items())
            result.problems.append(Problem(name, "label", f"annotation {annotation.get('id')}: {detail}"))
            continue
        missing_video = _store_video(data.get("path") or "", labels_dir / "videos", clip_id)
        if missing_video:
            result.problems.append(Problem(name, "read", missing_video))
            continue
        from avlabel.eval.review import differing_fields

        corrected = differing_fields(label, data.get("model_label") or {})
        mark = {"tool": TOOL, "task": task.get("id"), "annotation": annotation.get("id"),
                "annotator": annotation.get("completed_by"), "corrected": corrected}
        path = labels_dir / "metas" / f"{clip_id}{LABEL_SUFFIX}"
        text = json.dumps({**json.loads(schema.label_to_json(label)), REVIEW_KEY: mark}, ensure_ascii=False, indent=2)
        path.write_text(text + "\n", encoding="utf-8")
        result.written.append(path)
        result.corrected_fields += len(corrected)
    return result


# ----------------------------------------------------------------------------- a server, through the SDK


class LabelStudioError(ValueError):
    """The server can't be reached or refused a request; the message is the one line to print."""


def connect(url: str):
    """A label-studio-sdk client of the server at `url`, with the access token from LABEL_STUDIO_API_KEY."""
    sdk = require("label_studio_sdk", "labelstudio", "Talking to a Label Studio server")
    key = os.environ.get(API_KEY_ENV)
    if not key:
        raise LabelStudioError(f"--label_studio {url}: set {API_KEY_ENV} to your access token "
                               "(Label Studio: Account & Settings)")
    return sdk.LabelStudio(base_url=url.rstrip("/"), api_key=key)


@contextlib.contextmanager
def server_errors(url: str, doing: str) -> Iterator[None]:
    """Turn the SDK's transport and HTTP errors into one LabelStudioError line saying what failed and why."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except httpx.HTTPError as err:
        raise LabelStudioError(f"--label_studio {url}: can't reach the server while {doing} ({err}); start "
                               "Label Studio or check the URL") from None
    except ApiError as err:
        if err.status_code in (401, 403):
            hint = f"it refused the access token in {API_KEY_ENV}"
        else:
            body = err.body if isinstance(err.body, str) else json.dumps(err.body, default=str)
            # a page, not the API's JSON: a wrong URL, or a project that is not there (Label Studio's 404 page)
            said = "a web page, not the API's answer" if str(body).lstrip().startswith("<") else one_line(body)[:300]
            hint = f"HTTP {err.status_code}: {said}"
        raise LabelStudioError(f"--label_studio {url}: {doing} failed, {hint}") from None


def push_tasks(client, title: str, tasks: list[dict[str, Any]], clips_dirs: Iterable[str | Path] = ()) -> int:
    """Create a project with the schema's labeling config, import the tasks; returns the project id.

    Each of `clips_dirs` (folders holding the clips, below the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT,
    which is the tasks' --media_root) becomes a local storage of the project: Label Studio serves a local file
    only to a project whose storage holds it, and only with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true.
    """
    project = client.projects.create(title=title, label_config=labeling_config())
    try:
        for folder in sorted({str(Path(folder).resolve()) for folder in clips_dirs}):
            client.import_storage.local.create(project=project.id, path=folder, title=f"clips: {Path(folder).name}",
                                               use_blob_urls=False)
        client.projects.import_tasks(id=project.id, request=tasks)
    except Exception:
        with contextlib.suppress(Exception):  # a half-made project would only be made again by the rerun
            client.projects.delete(id=project.id)
        raise
    return project.id


def export_tasks(client, project_id: int) -> list[dict[str, Any]]:
    """The project's tasks with their annotations and predictions, as Label Studio's JSON export."""
    data = b"".join(client.projects.exports.download_sync(project_id, export_type="JSON", download_all_tasks=True))
    return json.loads(data)
