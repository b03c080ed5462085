"""The clip catalog: indexing, filters, full text, meaning, gallery, export and slices.

A caption run is made from the synthetic dataset's own labels with known changes (every
third clip's lighting flipped between day and night, one caption failed, one missing a
field), so every expected answer below is computed from those labels in plain Python,
independently of the SQL that the catalog runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess

import pytest

from avlabel import catalog
from avlabel.catalog import QueryError, index_dataset, index_run, search
from avlabel.core import schema

DAY, NIGHT = "Daytime (diffused light)", "Night (well-lit by streetlights)"
FOLLOWING = "Vehicle following"


def _human_labels(dataset_dir):
    import datasets

    loaded = datasets.load_dataset(str(dataset_dir))
    out = {}
    for split in loaded:
        rows = loaded[split].cast_column("video", datasets.Video(decode=False))
        for row in rows:
            out[row["clip_id"]] = (schema.row_to_label(row), row["video"]["path"])
    return out


def _caption_record(clip_id, video, label, **changes):
    record = {"clip_id": clip_id, "video": video, "model": "tiny-test-model", "adapter": "runs/sft/adapter",
              "prompt_sha": "0123abcd", "generation": {"temperature": 0.1}, "raw": schema.label_to_json(label),
              "label": label, "valid": True, "errors": {}, "prompt_tokens": 100, "completion_tokens": 50,
              "seconds": 0.1, "status": "ok", "error": None}
    return record | changes


def _write_run(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(synthetic_dataset_dir, tmp_path_factory):
    """A catalog holding the human labels and one caption run made from them with known changes."""
    root = tmp_path_factory.mktemp("catalog")
    humans = _human_labels(synthetic_dataset_dir)
    clips = sorted(humans)
    # one caption sees a pedestrian the human did not label: both manoeuvres at once, whatever the clips
    both = next(c for i, c in enumerate(clips) if i > 2 and humans[c][0]["interactive_expanded_metaaction"] == [FOLLOWING])
    captions, records = {}, []
    for index, clip_id in enumerate(clips):
        human, video = humans[clip_id]
        label = dict(human)
        if index % 3 == 0:  # a known disagreement with the human label
            label["lighting"] = DAY if label["lighting"].startswith("Night") else NIGHT
        if clip_id == both:
            label["interactive_expanded_metaaction"] = ["Yield to VRUs", FOLLOWING]
        if index == 1:
            records.append(_caption_record(clip_id, video, {}, status="failed", valid=False, raw="",
                                           error=f"{video}: decoding failed"))
            captions[clip_id] = {}
            continue
        if index == 2:
            del label["weather"]
            records.append(_caption_record(clip_id, video, label, valid=False, errors={"weather": ["is missing"]}))
            captions[clip_id] = label
            continue
        records.append(_caption_record(clip_id, video, label))
        captions[clip_id] = label
    run_dir = _write_run(root / "sft", records)
    db = root / "catalog.db"
    first = index_run(db, run_dir)
    humans_report = index_dataset(db, synthetic_dataset_dir, name="synthetic")
    embedded = catalog.embed_pending(db)
    return dict(db=db, root=root, run_dir=run_dir, captions=captions, humans={c: h for c, (h, _) in humans.items()},
                videos={c: v for c, (_, v) in humans.items()}, first=first, humans_report=humans_report,
                embedded=embedded, dataset=synthetic_dataset_dir)


def _ids(result):
    return {hit.clip_id for hit in result.hits}


def _all(db, **query):
    return search(db, limit=None, **query)


def test_index_reports_and_embeds_everything(world):
    assert (world["first"].added, world["first"].problems) == (len(world["captions"]), [])
    assert world["humans_report"].added == len(world["humans"])
    assert world["embedded"].texts > 0 and world["embedded"].pending == 0
    con = sqlite3.connect(world["db"])
    # typed columns from the schema: a category outside the list is refused by the database itself
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        con.execute("UPDATE annotations SET weather = 'Sunny' WHERE id = (SELECT min(id) FROM annotations)")
    provenance = con.execute("SELECT DISTINCT source, model, adapter, prompt_sha FROM annotations WHERE kind = 'model'").fetchall()
    assert provenance == [("sft", "tiny-test-model", "runs/sft/adapter", "0123abcd")]
    con.close()


FILTER_CASES = [
    (["weather=heavy rain"], lambda c, h: c.get("weather") == "Heavy rain"),
    (["lighting=Night*"], lambda c, h: c.get("lighting", "").startswith("Night")),
    (["metaaction=Yield to VRUs"], lambda c, h: "Yield to VRUs" in (c.get("interactive_expanded_metaaction") or [])),
    (["metaaction=Yield to VRUs&Vehicle following"],
     lambda c, h: {"Yield to VRUs", "Vehicle following"} <= set(c.get("interactive_expanded_metaaction") or [])),
    (["metaaction!=Vehicle following"],
     lambda c, h: "interactive_expanded_metaaction" in c and "Vehicle following" not in (c["interactive_expanded_metaaction"] or [])),
    (["metaaction=null"], lambda c, h: "interactive_expanded_metaaction" in c and c["interactive_expanded_metaaction"] is None),
    (["driving_difficulty>=3"], lambda c, h: c.get("driving_difficulty", 0) >= 3),
    (["difficulty=2..3", "interesting=true"], lambda c, h: c.get("driving_difficulty") in (2, 3) and c.get("interesting_scenario") == "True"),
    (["rule_violation=false", "weather!=Partly cloudy"],
     lambda c, h: c.get("rule_violation") == "False" and "weather" in c and c["weather"] != "Partly cloudy"),
    (["human.lighting=Night*", "lighting=Daytime*"], lambda c, h: h["lighting"].startswith("Night") and c.get("lighting", "").startswith("Daytime")),
    (["valid=false"], lambda c, h: c == {} or "weather" not in c),
    (["run=sft", "road_type~highway"], lambda c, h: "highway" in c.get("road_type", "").lower()),
]


@pytest.mark.parametrize("where,expected", FILTER_CASES, ids=[" & ".join(w) for w, _ in FILTER_CASES])
def test_filters_return_the_expected_clips(world, where, expected):
    result = _all(world["db"], where=where)
    wanted = {clip for clip, label in world["captions"].items() if expected(label, world["humans"][clip])}
    assert wanted, f"the synthetic clips should hold a case for {where}"
    assert _ids(result) == wanted
    assert result.total == len(wanted)


def test_counts_cover_the_whole_matching_set(world):
    result = search(world["db"], where=["driving_difficulty>=2"], limit=2)
    matching = [c for c in world["captions"].values() if c.get("driving_difficulty", 0) >= 2]
    assert len(result.hits) == 2 and result.total == len(matching)
    weather = {}
    for label in matching:
        key = label.get("weather", "(missing)")
        weather[key] = weather.get(key, 0) + 1
    assert result.counts["weather"] == weather
    manoeuvres = {}
    for label in matching:
        for value in label.get("interactive_expanded_metaaction") or []:
            manoeuvres[value] = manoeuvres.get(value, 0) + 1
    assert result.counts["interactive_expanded_metaaction"] == manoeuvres
    assert result.counts["run"] == {"sft": len(matching)}


def _texts(label):
    return " ".join(label.get(name) or "" for name in schema.TEXT_FIELD_NAMES)


@pytest.mark.parametrize("text,pattern", [
    ("pedestrian", r"\bpedestrians?\b"),
    ('"zebra crossing"', r"\bzebra crossing\b"),
    ("snow OR fog", r"\b(snow|fog)\b"),
    ("road_type:highway", None),
])
def test_full_text_returns_the_expected_clips(world, text, pattern):
    result = _all(world["db"], text=text)
    if pattern is None:
        wanted = {c for c, label in world["captions"].items() if "highway" in label.get("road_type", "").lower()}
    else:
        wanted = {c for c, label in world["captions"].items() if re.search(pattern, _texts(label), re.IGNORECASE)}
    assert wanted and _ids(result) == wanted
    assert all("\x02" in "".join(hit.highlights.values()) for hit in result.hits)  # matches are marked


def test_semantic_search_finds_the_situation_in_other_words(world):
    def with_word(word):
        return {c for c, label in world["captions"].items() if word in _texts(label).lower()}

    walkers = with_word("pedestrian")
    result = search(world["db"], semantic="somebody on foot walks across the street in front of the car", limit=3)
    assert len(walkers) >= 3 and result.hits and _ids(result) <= walkers
    assert all(hit.similarity >= 0.25 for hit in result.hits)
    snowy = with_word("snow")
    result = search(world["db"], semantic="winter driving with snowfall", limit=len(snowy))
    assert snowy and _ids(result) == snowy


def test_filters_text_and_meaning_combine_in_one_ranked_query(world):
    where = ["lighting=Night*"]
    result = _all(world["db"], where=where, text="car", semantic="a car drives ahead of us in the dark")
    night_with_car = {c for c, label in world["captions"].items()
                      if label.get("lighting", "").startswith("Night") and re.search(r"\bcars?\b", _texts(label), re.I)}
    assert _ids(result) <= night_with_car and result.total >= 1
    scores = [hit.score for hit in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(hit.bm25 is not None and hit.similarity is not None for hit in result.hits)


@pytest.mark.parametrize("where,message", [
    (["weather=Heavy snow"], r"weather: unknown category 'Heavy snow' \(expected one of: Clear skies, .*Heavy rain"),
    (["weather=none"], r"'weather=none': weather is a required field, never null; filter on one of its values"),
    (["lighting=Dusk*"], r"'Dusk\*' matches none of: Daytime"),
    (["driving_difficulty>=5"], r"driving_difficulty: must be an integer from 1 to 4"),
    (["metaaction=Overtake bicycles"], r"unknown category 'Overtake bicycles'"),
    (["wether=Clear skies"], r"unknown field 'wether'; fields are: weather, lighting"),
    (["weather>Overcast"], r"operator > does not apply to weather"),
])
def test_a_value_the_schema_does_not_know_fails_clearly(world, where, message):
    with pytest.raises(QueryError, match=message):
        search(world["db"], where=where)


def test_command_line_query_writes_json_and_rejects_unknown_values(world, tmp_path, capsys):
    from avlabel import cli

    out = tmp_path / "result.json"
    cli.main(["search", "--db", str(world["db"]), "--where", "weather=Heavy rain", "--text", "wet",
                  "--json_out", str(out)])
    written = json.loads(out.read_text())
    api = _all(world["db"], where=["weather=Heavy rain"], text="wet")
    assert {h["clip_id"] for h in written["hits"]} == _ids(api) and written["total"] == api.total
    assert "matching" in capsys.readouterr().out
    for argv, code, message in [
        (["--where", "weather=Sunny"], 2, "error: weather: unknown category 'Sunny'"),
        # an --export folder that holds something else: one line, exit 1, the folder untouched
        (["--export", str(tmp_path)], 1, f"error: {tmp_path}: not empty and not made by `avlabel build`"),
        (["--text", "zyxwvu", "--export", str(tmp_path / "none")], 2, "error: nothing to export: no clip matches"),
    ]:
        with pytest.raises(SystemExit) as exited:
            cli.main(["search", "--db", str(world["db"]), *argv])
        lines = capsys.readouterr().err.splitlines()
        assert exited.value.code == code and len(lines) == 1 and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_caption_labels_that_are_not_canonical_are_normalised_or_set_aside(world, tmp_path):
    clip_a, clip_b = sorted(world["captions"])[:2]
    label = dict(world["humans"][clip_a])
    loose = _caption_record(clip_a, None, label | {"weather": "heavy  RAIN", "rule_violation": "yes", "driving_difficulty": "2"})
    wrong = _caption_record(clip_b, None, label | {"weather": "Sunny", "road_type": "  Highway \u2013 four lanes "})
    report = index_run(tmp_path / "loose.db", _write_run(tmp_path / "loose", [loose, wrong]))
    assert report.problems == [f"{tmp_path / 'loose' / 'captions.jsonl'}:2: clip {clip_b}: weather unknown category "
                               "'Sunny' (expected one of: " + ", ".join(schema.FIELDS_BY_NAME["weather"].choices) +
                               "); stored as missing"]
    hits = {hit.clip_id: hit for hit in search(tmp_path / "loose.db", limit=None).hits}
    assert hits[clip_a].label == label | {"weather": "Heavy rain", "rule_violation": "True", "driving_difficulty": 2}
    assert hits[clip_a].valid and not hits[clip_b].valid and "weather" in hits[clip_b].errors
    assert hits[clip_b].label["road_type"] == "Highway - four lanes"  # the schema's text cleaning


def test_a_run_is_read_as_evaluation_reads_it_shards_and_failed_retries_included(world, tmp_path):
    """An unfinished 2-process run (only its shards) whose retry of one clip failed after a success: the
    catalog keeps the clips and the records that `avlabel compare` and `review` keep."""
    from avlabel.eval.data import load_predictions

    clip_a, clip_b, clip_c = sorted(world["captions"])[:3]
    label = dict(world["humans"][clip_a])
    failed = _caption_record(clip_a, None, label) | {"status": "failed", "error": "CUDA out of memory", "label": None,
                                                     "raw": None, "valid": False}
    run = tmp_path / "unfinished"
    run.mkdir()
    for rank, records in enumerate([[_caption_record(clip_a, None, label), _caption_record(clip_b, None, label)],
                                    [_caption_record(clip_c, None, label | {"weather": "Dense fog"}), failed]]):
        (run / f"captions.rank-{rank:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    db = tmp_path / "unfinished.db"
    report = index_run(db, run)
    assert report.records == 3
    assert report.problems == [f"{run / 'captions.rank-00001.jsonl'}:2: clip {clip_a} appears again; "
                               "the earlier successful record is used"]
    hits = {hit.clip_id: hit for hit in search(db, limit=None).hits}
    predictions, _ = load_predictions(run)
    assert set(hits) == set(predictions) == {clip_a, clip_b, clip_c}
    assert hits[clip_a].valid and hits[clip_a].label == predictions[clip_a].label == label
    assert hits[clip_c].label["weather"] == "Dense fog"
    assert not index_run(db, run).changed  # the same files again: nothing to do
    with pytest.raises(FileNotFoundError, match="no captions.jsonl"):
        index_run(db, tmp_path / "empty_folder")


def test_indexing_twice_changes_nothing_and_reindexing_is_incremental(world, tmp_path):
    db = tmp_path / "copy.db"
    shutil.copy(world["db"], db)
    con = sqlite3.connect(db)
    before = list(con.iterdump())
    again = index_run(db, world["run_dir"])
    humans = index_dataset(db, world["dataset"], name="synthetic")
    assert not again.changed and not humans.changed
    assert again.unchanged == len(world["captions"]) and humans.unchanged == len(world["humans"])
    assert list(con.iterdump()) == before

    # one caption rewritten, one gone: only those two rows change
    lines = (world["run_dir"] / "captions.jsonl").read_text().splitlines()
    changed = json.loads(lines[3])
    changed["label"]["safety_analysis"] = "A moose crosses the road and the ego vehicle brakes hard."
    run = tmp_path / "sft"
    _write_run(run, [json.loads(line) for line in lines[:3]] + [changed] + [json.loads(line) for line in lines[5:]])
    report = index_run(db, run, run="sft")
    assert (report.added, report.updated, report.removed) == (0, 1, 1)
    assert _ids(_all(db, text="moose")) == {changed["clip_id"]}
    assert json.loads(lines[4])["clip_id"] not in _ids(_all(db, runs=["sft"]))
    assert not index_run(db, run, run="sft").changed
    con.close()


def _chromium():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed here (apt-get install -y chromium)")
    return binary


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run", "--mute-audio"]


def test_gallery_renders_thumbnails_fields_and_disagreements_in_chromium(world, tmp_path):
    import numpy as np
    from PIL import Image

    from avlabel.catalog.view import write_gallery

    result = search(world["db"], where=["human.lighting=Night*"], text="car", limit=3)
    assert any("lighting" in hit.disagreements for hit in result.hits)
    page = write_gallery(result, tmp_path / "gallery.html")
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    chromium = _chromium()
    url = page.resolve().as_uri()
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    assert dom.count('class="thumb"') >= 4 * len(result.hits)
    assert dom.count('data-field="safety_analysis"') == len(result.hits)
    assert dom.count('class="disagree" data-field="lighting"') == sum("lighting" in h.disagreements for h in result.hits)
    assert "<mark>car</mark>" in dom
    shot = tmp_path / "gallery.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, "--window-size=1200,1000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=60, check=True)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (1000, 1200, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 2000  # photographs, not just text on a plain page
    # the disagreement rows' background colour (#ffe3de) is on screen
    assert np.all(image == (255, 227, 222), axis=-1).sum() > 500


def test_export_builds_a_dataset_of_the_matching_clips(world, tmp_path):
    import datasets

    from avlabel.catalog.use import export_dataset

    result = _all(world["db"], where=["human.lighting=Night*"])
    exported = export_dataset(result.hits, tmp_path / "night cases", labels="human", test_size=0)
    assert exported.clips == len(_ids(result)) and exported.human_labels == exported.clips
    # the manifest the build read is inside the dataset folder, hidden (it names local paths): nothing beside it,
    # and publishing the folder leaves it out
    assert [path.name for path in tmp_path.iterdir()] == ["night cases"]
    assert exported.manifest == tmp_path / "night cases" / ".export_manifest.jsonl"
    assert len(exported.manifest.read_text().splitlines()) == exported.clips
    from avlabel.hub.publish import publish_dataset

    published = publish_dataset(tmp_path / "night cases", "tester/night-cases", dry_run_dir=tmp_path / "dry_run")
    assert "README.md" in published.files and not any("manifest" in name for name in published.files)
    loaded = datasets.load_dataset(str(tmp_path / "night cases"), cache_dir=str(tmp_path / "hf_cache"))
    rows = loaded["train"]
    assert isinstance(rows.features["video"], datasets.Video)
    assert set(rows["clip_id"]) == {c for c, h in world["humans"].items() if h["lighting"].startswith("Night")}
    for row in rows.select_columns(["clip_id", *schema.FIELD_NAMES]):
        assert schema.row_to_label(row) == world["humans"][row["clip_id"]]
    assert (tmp_path / "night cases" / "README.md").is_file()


def test_slice_metrics_match_hand_counts(world):
    from avlabel.catalog.use import parse_slice, slice_metrics

    slices = dict(parse_slice(s) for s in ["night: human.lighting=Night*", "day: human.lighting=Daytime*"])
    results = slice_metrics(world["db"], slices, run="sft")
    for name, prefix in (("night", "Night"), ("day", "Daytime")):
        clips = [c for c, h in world["humans"].items() if h["lighting"].startswith(prefix)]
        right = sum(world["captions"][c].get("lighting") == world["humans"][c]["lighting"] for c in clips)
        assert results[name]["n"] == len(clips)
        assert results[name]["fields"]["lighting"]["value"] == pytest.approx(right / len(clips))
        assert results[name]["fields"]["lighting"]["metric"] == "accuracy"


def test_the_terminal_listing_reads_at_80_columns(world):
    """Free text wraps at words over the whole width, not one word a line in a narrow column."""
    import io

    from avlabel.catalog import print_result

    result = search(world["db"], where=["weather=Heavy rain"], text="wet", limit=5)
    model_hits = [hit for hit in result.hits if hit.highlights]
    assert model_hits, "the query should match some free text"
    out = io.StringIO()
    print_result(result, file=out, width=80)
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    for hit in model_hits:
        name, marked = next(iter(hit.highlights.items()))
        assert any(line.strip().startswith(f"{name}: ") for line in lines)
    words_per_text_line = [len(line.split()) for line in lines if line.startswith("    ")]
    assert min(words_per_text_line) >= 3, lines  # no line of a single word


def _scored_records(world):
    """The world's captions again, now carrying the model's confidence: per closed field a probability
    that varies over clips and fields, and the clip's as their minimum, in the layout `avlabel caption` writes
    ({field: p} + clip_confidence, free-text signals apart)."""
    records, expected = [], {}
    for index, line in enumerate((world["run_dir"] / "captions.jsonl").read_text().splitlines()):
        record = json.loads(line)
        if record["status"] != "ok":
            records.append(record | {"confidence": None})
            continue
        per_field = {name: round(0.05 + ((index * 7 + position * 3) % 10) / 10, 2)
                     for position, name in enumerate(schema.CLOSED_FIELD_NAMES) if name in record["label"]}
        clip = min(per_field.values())
        record |= {"confidence": dict(per_field), "clip_confidence": clip, "text_mean_logprob": {"road_type": -0.3}}
        if index == 4:  # not a probability: reported, and the field stored without one
            record["confidence"]["weather"] = 1.7
            del per_field["weather"]
        records.append(record)
        expected[record["clip_id"]] = (per_field, clip)
    return records, expected


def test_confidence_is_stored_filtered_sorted_and_outlined(world, tmp_path):
    from avlabel.catalog.view import write_gallery

    db = tmp_path / "scored.db"
    shutil.copy(world["db"], db)
    records, expected = _scored_records(world)
    report = index_run(db, _write_run(tmp_path / "scored", records))
    assert len(report.problems) == 1 and "confidence of weather is 1.7, not a probability" in report.problems[0]

    def clips(**query):
        return _ids(search(db, runs=["scored"], limit=None, **query))

    assert clips(where=["confidence<0.3"]) == {c for c, (_, clip) in expected.items() if clip < 0.3}
    assert clips(where=["lighting.confidence<0.5"]) == {c for c, (fields, _) in expected.items() if fields.get("lighting", 1) < 0.5}
    assert clips(where=["confidence=0.2..0.6", "weather.confidence>=0.5"]) == {
        c for c, (fields, clip) in expected.items() if 0.2 <= clip <= 0.6 and fields.get("weather", 0) >= 0.5}
    least_first = search(db, runs=["scored"], sort="confidence", limit=None).hits
    assert [hit.clip_confidence for hit in least_first] == sorted(clip for _, clip in expected.values()) + [None]
    most_first = search(db, runs=["scored"], sort="-lighting.confidence", limit=None).hits
    lighting = [hit.confidence.get("lighting") for hit in most_first if hit.confidence.get("lighting") is not None]
    assert lighting == sorted(lighting, reverse=True) and len(lighting) == len(expected)
    for hit in least_first[:-1]:
        assert (hit.confidence, hit.clip_confidence) == expected[hit.clip_id]
    # the unscored run and the human labels carry none, and are unchanged
    assert all(hit.confidence == {} and hit.clip_confidence is None for hit in search(db, runs=["sft"], limit=None).hits)

    shown = search(db, runs=["scored"], sort="confidence", limit=3)
    html = write_gallery(shown, tmp_path / "gallery.html", low_confidence=0.5).read_text()
    low = sum(p < 0.5 for hit in shown.hits for p in hit.confidence.values())
    assert low and html.count('<td class="low-confidence">') == low
    assert html.count('<td class="confidence">') + html.count('<td class="confidence low-confidence">') == \
        len(shown.hits) * len(schema.FIELDS)

    for bad, message in [("human.confidence<0.5", "human labels carry no confidence"),
                         ("road_type.confidence<0.5", "closed fields only"),
                         ("confidence<1.5", "a probability from 0 to 1"),
                         ("confidence!=0.5", "operator != does not apply")]:
        with pytest.raises(QueryError, match=message):
            search(db, where=[bad])
    with pytest.raises(QueryError, match="can't sort by 'weather'"):
        search(db, sort="weather")


SEMANTIC_CASES = [
    dict(semantic="somebody on foot walks across the street in front of the car"),
    dict(semantic="winter driving with snowfall", where=["lighting=Day*"]),
    dict(semantic="a car drives ahead of us in the dark", text="car", where=["lighting=Night*"]),
    dict(semantic="traffic light at a junction", neighbours=3),
    dict(semantic="traffic light at a junction", kind="human", min_similarity=0.1),
]


def test_the_vector_index_answers_like_the_exact_scan_and_follows_new_vectors(world, tmp_path, monkeypatch):
    from avlabel.catalog import query, vectors

    db = tmp_path / "indexed.db"
    shutil.copy(world["db"], db)

    def answer(**case):
        """The matching set with each one's similarity, and the counts over it (the order of near-equal
        similarities may differ: the index computes them from its own copy of the float16 vectors)."""
        result = search(db, limit=None, **case)
        return {(hit.clip_id, hit.kind): hit.similarity for hit in result.hits}, result.counts

    monkeypatch.setattr(vectors, "EXACT_BELOW", 10**9)  # a scan of every vector
    exact = [answer(**case) for case in SEMANTIC_CASES]
    assert all(hits for hits, _ in exact)
    monkeypatch.setattr(vectors, "EXACT_BELOW", 1)  # the index, however small the catalog
    for case, (hits, counts) in zip(SEMANTIC_CASES, exact):
        assert answer(**case) == (pytest.approx(hits, abs=1e-4), counts), case
    index_file = vectors.index_file(sqlite3.connect(db))
    assert index_file.is_file()
    # a filter that few of the nearest pass: the index gives up after one round and the rows are scanned
    selective = dict(semantic="a vehicle ahead", where=[f"clip_id={sorted(world['captions'])[5]}"], neighbours=2,
                     min_similarity=-1.0)
    monkeypatch.setattr(vectors, "EXACT_BELOW", 10**9)
    scanned, counts = answer(**selective)
    monkeypatch.setattr(vectors, "EXACT_BELOW", 1)
    monkeypatch.setattr(query, "ANN_ROUNDS", 1)
    assert len(scanned) == 1 and answer(**selective) == (pytest.approx(scanned, abs=1e-4), counts)

    # a new caption: left out (and said so) until it is embedded, then found through the updated index
    moose = _caption_record("clip_moose", None, {**world["captions"][sorted(world["captions"])[0]],
                                                 "safety_analysis": "A moose steps onto the road; the ego vehicle brakes hard."})
    index_run(db, _write_run(tmp_path / "moose", [moose]))
    waiting = search(db, semantic="a large wild animal on the road", runs=["moose"])
    assert not waiting.hits and "1 otherwise matching annotations have no embedding yet" in waiting.notes[0]
    embedded = catalog.embed_pending(db)
    assert embedded.texts == 1 and embedded.vectors_indexed == 1
    found = search(db, semantic="a large wild animal on the road", limit=1)
    assert found.clip_ids() == ["clip_moose"] and not found.notes
    # an index file that is gone is built again
    index_file.unlink()
    assert search(db, semantic="a large wild animal on the road", limit=1).clip_ids() == ["clip_moose"]
    assert index_file.is_file()
