"""The README's first command: the whole loop on synthetic clips, as a newcomer runs it, with a tiny model of
each family (Qwen2.5-VL: Cosmos Reason 1's architecture; Qwen3-VL: Cosmos Reason 2's).

Each run takes minutes on a CPU, over the quick loop's budget: the whole module is `slow` (CI runs it).
"""

import json

import pytest
from conftest import NETWORK_LOG

from avlabel.demo.run import VISUAL_FIELDS

pytestmark = pytest.mark.slow  # the whole loop: minutes

# Measured on 2 cores: the fine-tuned tiny model gets 85-100% on these fields where the
# untrained one gets 0% and the most common answer 22-45%. The test asks for a clear margin.
MARGIN = 0.2


# CI runs the second family's whole loop on few clips and steps (as the installed-wheel demo does), to keep the
# suite's time: that shows every stage works for Qwen3-VL but is too short to ask for the accuracy margin. (Its full loop, about 1.4x the Qwen2.5-VL
# demo's time on a CPU, clears it: in one run weather 72%, lighting and traffic light 92%, against 35, 28 and 38%
# for the most common answer and 0% untrained.)
SHORT_LOOP = ("--num_clips", "24", "--test_clips", "4", "--max_steps", "8", "--calibration_clips", "4")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def demo(request, demo_of):
    """(output folder, what it printed); tests/conftest.py runs each once a session."""
    return demo_of(request.param, *(() if request.param == "qwen2_5_vl" else SHORT_LOOP))


@pytest.mark.timeout(1300)
def test_fine_tuning_beats_the_untrained_model_and_the_majority_answer(demo_run):
    out, _ = demo_run  # the full demo (Qwen2.5-VL)
    accuracy = json.loads((out / "eval" / "visual_accuracy.json").read_text())
    for field in VISUAL_FIELDS:
        row = accuracy[field]
        assert row["fine-tuned"] >= row["baseline"] + MARGIN, (field, row)
        assert row["fine-tuned"] >= row["majority answer"] + MARGIN, (field, row)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["runs"] == ["baseline", "fine-tuned"]
    assert results["runs_summary"]["fine-tuned"]["json_valid_rate"] > 0.9
    assert results["runs_summary"]["baseline"]["json_valid_rate"] < results["runs_summary"]["fine-tuned"]["json_valid_rate"]
    # acceptance (issue 19): the calibration fitted on clips of another seed lowers the test split's mean ECE
    calibration = results["calibration"]["runs"]["fine-tuned"]
    assert calibration["calibrated"], calibration
    assert calibration["mean_ece"]["calibrated"] < calibration["mean_ece"]["raw"], calibration["mean_ece"]


@pytest.mark.timeout(1300)
def test_demo_writes_every_artifact_and_says_where(demo, request):
    out, stdout = demo
    short_loop = request.node.callspec.params["demo"] != "qwen2_5_vl"
    html = (out / "eval" / "report.html").read_text()
    assert "<table" in html and "fine-tuned" in html and "weather" in html
    assert (out / "eval" / "deterministic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no judge endpoint configured" in stdout  # and how to add one
    card_path = next((out / "publish" / "models").glob("*/*/README.md"))
    if not short_loop:  # the short loop's 8 calibration clips are too few to fit; it goes on uncalibrated
        assert (out / "eval" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "Calibration of closed-set confidence" in html
        assert (card_path.parent / "calibration.json").is_file()  # published with the model, beside sampling_config.json
        assert "confidence calibration" in stdout
    card = card_path.read_text()
    assert "model-index" in card and "randomly initialised" in card
    assert (next((out / "publish" / "datasets").glob("*/*")) / "README.md").is_file()
    assert (out / "sft" / "loss_curve.png").is_file()
    gallery = (out / "catalog_gallery.html").read_text()
    hits = gallery.count('<article class="clip"')
    assert gallery.count('<div class="strip">') == hits  # every hit shows its frames
    # the short loop's 40 steps may not yet say "Night" on its 8 test clips; the full demo's query must find some
    assert hits > 0 or short_loop
    for artifact in ("report (HTML)", "catalog gallery", "model repo as it would be pushed"):
        assert artifact in stdout
    # no network, as the README says: no process of the demo looked up a host (tests/conftest.py logs each one)
    log = out.parent / NETWORK_LOG
    assert not log.exists(), f"the demo looked up {sorted(set(log.read_text().split()))}"


def test_the_artifact_listing_gives_whole_paths(tmp_path, capsys, monkeypatch):
    """The demo's last lines say where each artifact is; a long path must not be cut at the console's width."""
    from avlabel.demo.run import print_artifacts

    monkeypatch.chdir(tmp_path)
    deep = tmp_path / "a_rather_long_output_folder_name" / "publish" / "models" / "your-name" / "tiny-av-labeler"
    artifacts = {"model repo as it would be pushed": deep, "report (HTML)": tmp_path / "eval" / "report.html"}
    print_artifacts(artifacts, 12.0)
    lines = capsys.readouterr().out.splitlines()
    assert "Demo finished in 12 s" in lines[1]
    for what, where in artifacts.items():
        assert any(what in line and line.endswith(" " + str(where.relative_to(tmp_path))) for line in lines), lines
