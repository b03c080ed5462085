"""Judge throughput: 1,000 clips x 15 fields against a local OpenAI-compatible endpoint that answers in 1 s.

The recipe judges one field at a time, one call after another: 15,000 calls x 1 s = 15,000 s
(over four hours), paid again on every rerun. This runs the same 15,000 judgments through
`eval.judge.Judge` at its default concurrency, then reruns them (every answer should come from
the cache: zero calls), then (for information) judges the same clips with one call per clip.

The endpoint is `tests/openai_server.py` in its own process, sleeping `--latency` seconds per
reply. Every question is made distinct (each answer carries its clip id), so the cache cannot
shortcut the first run the way identical answers (e.g. "Clear skies" vs "Clear skies" on many
clips) would in real data. Writes bench/results/judge.json.

    python bench/judge.py [--clips 1000] [--latency 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from avlabel.core import schema  # noqa: E402
from avlabel.eval.data import render_value  # noqa: E402
from avlabel.eval.judge import Judge, JudgeConfig, JudgeItem  # noqa: E402
from eval_labels import perturbed, random_label  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "openai_server.py"), "--latency", str(latency)],
                              stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if not line.startswith("listening on "):
        server.kill()
        raise RuntimeError(f"the test server did not start: {line!r}")
    return server, line.split()[-1]


def server_requests(base_url: str) -> int:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)["requests"]


def distinct_items(clips: int, seed: int = 0) -> list[JudgeItem]:
    """Realistic label pairs whose every answer names its clip, so no two questions coincide."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(clips):
        reference = random_label(rng)
        prediction = perturbed(reference, rng, 0.5)
        tag = f" [clip {i:05d}]"
        items.append(JudgeItem(f"clip{i:05d}", {k: render_value(v) + tag for k, v in reference.items()},
                               {k: render_value(v) + tag for k, v in prediction.items()}))
    return items


def timed_run(config: JudgeConfig, items: list[JudgeItem], base_url: str, desc: str) -> dict:
    before = server_requests(base_url)
    judge = Judge(config)
    started = time.perf_counter()
    judgments = judge.judge(items, desc=desc)
    wall = time.perf_counter() - started
    stats = judge.last
    judge.close()
    return {"wall_s": round(wall, 2), "requests": server_requests(base_url) - before, "judgments": len(judgments),
            "scored": stats.scored, "unscored": stats.unscored, "failed": stats.failed, "cached": stats.cached,
            "max_in_flight": stats.max_in_flight}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds the endpoint takes per reply")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "judge.json")
    args = parser.parse_args()

    fields = len(schema.FIELD_NAMES)
    items = distinct_items(args.clips)
    server, base_url = start_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = JudgeConfig(judge_model="bench-judge", judge_base_url=base_url, judge_api_key="bench",
                                 judge_cache=str(Path(tmp) / "cache.sqlite"))
            first = timed_run(config, items, base_url, "judging (per field)")
            rerun = timed_run(config, items, base_url, "rerun")
            config.judge_per_clip = True
            per_clip = timed_run(config, items, base_url, "judging (per clip)")
    finally:
        server.terminate()
        server.wait()

    recipe_serial_s = args.clips * fields * args.latency
    results = {
        "clips": args.clips,
        "fields": fields,
        "latency_s": args.latency,
        "concurrency": config.judge_concurrency,
        "wall_s": first["wall_s"],
        "recipe_serial_s": recipe_serial_s,
        "speedup": round(recipe_serial_s / first["wall_s"], 1),
        "requests": first["requests"],
        "judgments": first["judgments"],
        "scored": first["scored"],
        "max_in_flight": first["max_in_flight"],
        "rerun_requests": rerun["requests"],
        "rerun_wall_s": rerun["wall_s"],
        "rerun_cached": rerun["cached"],
        "per_clip": {"wall_s": per_clip["wall_s"], "requests": per_clip["requests"], "scored": per_clip["scored"]},
        "device": f"CPU only, {platform.machine()}, {os.cpu_count()} cores; judge client and endpoint on the same machine",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
