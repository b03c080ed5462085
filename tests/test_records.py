"""One rule picks a clip's caption record: captioning's merge and evaluation's reading agree on it."""

from __future__ import annotations

import json

from avlabel.core.records import latest_per_clip
from avlabel.eval.data import load_predictions
from avlabel.infer import records as caption_records


def _record(clip_id: str, status: str, weather: str | None = None) -> dict:
    label = {"weather": weather} if weather else {}
    return {"clip_id": clip_id, "status": status, "label": label, "valid": False, "error": None if status == "ok" else "boom"}


# (clip, status, a value to tell the records apart), in the order written: retries append
WRITTEN = [
    ("a", "failed", None), ("a", "ok", "Overcast"),  # a retry that worked
    ("b", "ok", "Overcast"), ("b", "failed", None),  # a later failure does not undo a success
    ("c", "ok", "Overcast"), ("c", "ok", "Light rain"),  # two successes: the later one
    ("d", "failed", None), ("d", "failed", None),  # two failures: the later one
]
EXPECTED = {"a": ("ok", "Overcast"), "b": ("ok", "Overcast"), "c": ("ok", "Light rain"), "d": ("failed", None)}


def test_the_rule():
    located = [(f"line {n}", _record(*entry)) for n, entry in enumerate(WRITTEN, 1)]
    problems = []
    chosen = latest_per_clip(located, problems)
    assert {clip: (r["status"], r["label"].get("weather")) for clip, r in chosen.items()} == EXPECTED
    assert len(problems) == 4 and "line 4: clip b appears again; the earlier successful record is used" in map(str, problems)


def test_caption_merge_and_eval_pick_the_same_records(tmp_path):
    # one process wrote half, a second run (two shards of a multi-process run) the rest
    shards = [WRITTEN[0::2], WRITTEN[1::2]]
    for rank, entries in enumerate(shards):
        path = caption_records.shard_path(tmp_path, rank, world_size=2)
        path.write_text("".join(json.dumps(_record(*entry)) + "\n" for entry in entries), encoding="utf-8")
    from_eval, problems = load_predictions(tmp_path)  # reads the shards of an unfinished run
    assert len(problems) == 4
    merged = caption_records.merge(tmp_path, ["a", "b", "c", "d"])
    assert {r["clip_id"]: (r["status"], r["label"].get("weather")) for r in merged} == EXPECTED
    assert {clip: (p.label.get("weather"), bool(p.errors.get("<caption>"))) for clip, p in from_eval.items()} == {
        clip: (weather if status == "ok" else None, status == "failed") for clip, (status, weather) in EXPECTED.items()
    }
    again, _ = load_predictions(tmp_path)  # the merged captions.jsonl: the same answers
    assert {c: p.label for c, p in again.items()} == {c: p.label for c, p in from_eval.items()}


def test_a_resumed_run_may_name_its_model_folder_another_way(tmp_path, monkeypatch):
    """`--model runs/merged` resumes a folder written with `--model ./runs/merged` or the absolute path."""
    import pytest

    from avlabel.core.errors import UsageError

    (tmp_path / "runs" / "merged").mkdir(parents=True)
    (tmp_path / "runs" / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    identity = {"model": "runs/merged", "adapter": None, "weights_sha": {"model": None, "adapter": None}, "prompt_sha": "p", "generation": {}, "calibration": None}
    for earlier in ("./runs/merged", str(tmp_path / "runs" / "merged"), "runs/merged/"):
        caption_records.check_same_run([{**identity, "model": earlier, "clip_id": "a"}], identity, tmp_path)
    for earlier in ("runs/other", "org/merged"):
        with pytest.raises(UsageError, match="captions made with a different model"):
            caption_records.check_same_run([{**identity, "model": earlier, "clip_id": "a"}], identity, tmp_path)
