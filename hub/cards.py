"""Cards written by code: the model card and the evaluation-run card.

Both are `huggingface_hub` cards rendered from the Jinja templates `hub/*.md.jinja`, with the
metadata in `ModelCardData` / `DatasetCardData` so that the Hub (and `HfApi().model_info`)
reads it: base model, datasets, license, tags, and the evaluation results as `model-index`
built from the eval package's `results.json` (one `EvalResult` per field). The dataset card is
the builder's (`data_builder/card.py`) and is published as it is.

Everything rendered here comes from files that `publish` has already scrubbed of secrets and
machine paths, and the card itself names local things by their folder name only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from avlabel.core.markdown import markdown_table
from avlabel.core.sampling import SamplingConfig
from avlabel.core.schema import FIELD_NAMES, FIELDS_BY_NAME
from avlabel.infer.settings import GenerationSettings

TEMPLATES = Path(__file__).parent  # model_card.md.jinja, eval_card.md.jinja (package data)
TASK_TYPE = "video-text-to-text"
TASK_NAME = "Dashcam clip labelling"
TEST_MODEL_TAGS = ["test-model", "randomly-initialised"]
# qwen-vl-utils, which the card's snippet samples frames with, resizes to multiples of its
# `image_patch_size` (default 14) times its own SPATIAL_MERGE_SIZE (2), whatever the model's merge
QWEN_VL_UTILS_PATCH_SIZE = 14
QWEN_VL_UTILS_MERGE_SIZE = 2
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (LoRA on a base quantised to {bits} bits)"}
# Licenses of base models we know; a fine-tune inherits its base model's terms.
NVIDIA_OPEN_MODEL_LICENSE = {
    "license": "other",
    "license_name": "nvidia-open-model-license",
    "license_link": "https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license",
}
BASE_MODEL_LICENSES = {
    "nvidia/cosmos-reason": NVIDIA_OPEN_MODEL_LICENSE,  # prefix: every Cosmos Reason release
    "qwen/qwen2.5-vl": {"license": "apache-2.0"},
    "qwen/qwen3-vl": {"license": "apache-2.0"},
}


class CardInputError(ValueError):
    """An input file of a card is missing or not what the producing command writes."""


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardInputError(f"{path}: missing ({what})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CardInputError(f"{path}: not valid JSON ({err}); expected {what}") from None
    if not isinstance(data, dict):
        raise CardInputError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def check_results(results: dict, source: str) -> dict:
    """The shape of `avlabel compare`'s results.json that the cards rely on."""
    runs, fields = results.get("runs"), results.get("fields")
    if not isinstance(runs, list) or not runs or not all(isinstance(r, str) for r in runs):
        raise CardInputError(f"{source}: 'runs' must be a non-empty list of run names")
    if not isinstance(fields, dict) or not fields:
        raise CardInputError(f"{source}: 'fields' must map each field to its per-run results")
    for name, per_run in fields.items():
        if not isinstance(per_run, dict):
            raise CardInputError(f"{source}: fields.{name} must map run names to results")
        for run, entry in per_run.items():
            if not isinstance(entry, dict) or "metric" not in entry or "value" not in entry:
                raise CardInputError(f"{source}: fields.{name}.{run} needs 'metric' and 'value'")
    try:
        trust_markdown(results.get("trust"))
    except (KeyError, TypeError, AttributeError) as err:
        raise CardInputError(f"{source}: 'trust' is not the judge-trust checks `avlabel compare` writes "
                             f"({type(err).__name__}: {err}); rerun compare or remove it") from None
    return results


def pick_run(results: dict, run: str | None, source: str) -> str:
    """The run that is the published model: the one named, else the last run compared."""
    if run is None:
        return results["runs"][-1]
    if run not in results["runs"]:
        raise CardInputError(f"{source}: no run named {run!r} (runs: {', '.join(results['runs'])})")
    return run


# ----------------------------------------------------------------------------- formatting


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _score(value: float) -> str:
    return f"{value:.3f}" if value == 0 or 0.01 <= abs(value) < 10 else f"{value:.4g}"


def _with_ci(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    text = _score(entry["value"])
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{_score(entry['ci_low'])}, {_score(entry['ci_high'])}]"
    return text


def _is_judge_metric(metric: str) -> bool:
    return "judge" in metric.lower()


def _field_order(fields: dict) -> list[str]:
    known = [name for name in FIELD_NAMES if name in fields]
    return known + sorted(name for name in fields if name not in FIELDS_BY_NAME)


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, f"{name}.")
        elif value is not None:
            rows.append((name, ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else _number(value)))
    return rows


def trust_markdown(trust: dict | None) -> str:
    """The judge-trust checks of the eval package (eval/trust.py): a summary, then the compare report's table."""
    if not trust:
        return ("The judge's trustworthiness was not checked in this run (`avlabel compare` with the trust checks "
                "on adds identity, shuffled-answer, order-swap, repeat and agreement checks).")
    from avlabel.eval.compare import trust_table  # compare imports scipy: only a judged evaluation needs it

    verdicts = [checks["verdict"] for checks in trust["fields"].values()]
    head = (f"Judge trust, checked on {trust['clips']} sampled clips with {trust['repeats']} repeats: "
            f"{verdicts.count('trustworthy')} fields trustworthy, {verdicts.count('doubtful')} doubtful, "
            f"{verdicts.count('untested')} untested. Identity: an answer judged against itself (should be near 5); "
            "shuffled: against another clip's answer (should be low); swap: score change when the answers trade "
            "places; repeat: standard deviation over repeated calls; Spearman: agreement with the exact score.")
    table = trust_table(trust)
    return f"{head}\n\n{markdown_table(table['header'], table['rows'])}"


def _sections(results: dict) -> list[tuple[str, dict]]:
    """(title, {field: {run: result}}) of the headline metric and, when it is the judge, the exact metrics too."""
    sections = [("Judge scores" if results.get("headline") == "judge" else "Headline metrics", results["fields"])]
    deterministic = results.get("deterministic")
    if results.get("headline") == "judge" and isinstance(deterministic, dict) and deterministic:
        sections.append(("Deterministic metrics", deterministic))
    return sections


def _results_table(fields: dict, runs: list[str], highlight: str | None) -> str:
    rows = []
    for name in _field_order(fields):
        per_run = fields[name]
        metric = next((per_run[r]["metric"] for r in runs if r in per_run), "–")
        n = next((per_run[r].get("n") for r in ([highlight] if highlight else []) + runs if r in per_run), None)
        rows.append([name, metric, *(_with_ci(per_run.get(r)) for r in runs), _number(n)])
    return markdown_table(["Field", "Metric", *[f"**{r}**" if r == highlight else r for r in runs], "n"], rows)


def evaluation_markdown(results: dict, highlight: str | None = None, charts: list[str] = (),
                        report: str | None = None, highlight_is: str = "this model") -> str:
    """Per-field results of every run with 95% intervals, the judge used and its trust checks."""
    runs = results["runs"]
    parts = [
        f"Scored on {results.get('clips', '?')} held-out clips against the human labels. Each cell is the value with "
        f"its 95% bootstrap confidence interval; exact metrics are in [0, 1], judge scores from 1 to 5."
        + (f" **{highlight}** is {highlight_is}" + (f", `{runs[0]}` the baseline." if highlight != runs[0] else ".")
           if highlight else "")
    ]
    for title, fields in _sections(results):
        parts += [f"### {title}", _results_table(fields, runs, highlight)]
    judge = results.get("judge")
    parts.append("### Judge")
    if judge:
        parts.append(f"Scores from 1 to 5 were given by an LLM judge, `{judge.get('model', '?')}` (judge prompt sha "
                     f"`{judge.get('prompt_sha', '?')}`), comparing each answer with the human one. A judge score "
                     "measures agreement with one annotator's wording, not correctness.")
        parts.append(trust_markdown(results.get("trust")))
    else:
        parts.append("No LLM judge was used: every field is scored by its deterministic metric (accuracy, F1, "
                     "balanced accuracy, sentence chrF). Add a judge with `avlabel compare --judge`.")
    parts += [f"![Per-field comparison of the runs: {Path(chart).stem}]({chart})" for chart in charts]
    if report:
        parts.append(f"The full report, with per-field details and the clips where the runs disagree most, is "
                     f"[{report}]({report}).")
    return "\n\n".join(parts)


def eval_results(results: dict, run: str, dataset_id: str, dataset_name: str, split: str = "test"):
    """`model-index` entries for one run: every field's metrics, each with its interval (and judge) in `args`."""
    from huggingface_hub import EvalResult

    judge = results.get("judge") or {}
    out = []
    for _, fields in _sections(results):
        for name in _field_order(fields):
            entry = fields[name].get(run)
            if not entry or entry.get("value") is None:
                continue
            # model-index has no slot for an interval or a judge: `args` is the free-form mapping
            # the spec allows per metric, so the numbers stay machine-readable.
            args = {key: (round(entry[key], 4) if isinstance(entry[key], float) else entry[key])
                    for key in ("ci_low", "ci_high", "n") if entry.get(key) is not None}
            args["confidence_level"] = results.get("confidence", 0.95)
            if judge and _is_judge_metric(entry["metric"]):
                args["judge"] = judge.get("model")
                args["judge_prompt_sha"] = judge.get("prompt_sha")
            out.append(EvalResult(
                task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=dataset_id, dataset_name=dataset_name,
                dataset_split=results.get("split", split), metric_type=entry["metric"],
                metric_name=f"{name} ({entry['metric']})", metric_value=round(float(entry["value"]), 4),
                metric_args=args,
            ))
    return out


# ----------------------------------------------------------------------------- model card


def resolve_license(base_model_id: str | None, license: str | None, test_model: bool) -> tuple[dict, str]:
    """Card metadata and prose for the license: explicit, else the base model's, else Apache-2.0 for test models."""
    if license:
        return {"license": license}, f"Released under the `{license}` license; check the base model's terms too."
    known = next((v for k, v in BASE_MODEL_LICENSES.items() if base_model_id and base_model_id.lower().startswith(k)), None)
    if known and known.get("license_name"):
        return dict(known), (f"The weights derive from `{base_model_id}` and are covered by its license, the "
                             f"[{known['license_name']}]({known['license_link']}).")
    if known:
        return dict(known), f"The weights derive from `{base_model_id}`, released under `{known['license']}`."
    if test_model:
        return {"license": "apache-2.0"}, "Random test weights, released under `apache-2.0` like the project's code."
    return {"license": "other"}, ("The license of the base model applies; it was not recognised, so pass "
                                  "`--license` to `avlabel publish` to name it.")


def hub_link(repo_id: str, repo_type: str = "model") -> str:
    from huggingface_hub import constants

    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{constants.ENDPOINT}/{prefix}{repo_id}"


def model_card(
    *,
    repo_id: str,
    train: dict,
    weights: str,
    base_model_id: str | None,
    base_model_name: str,
    dataset_id: str | None,
    dataset_name: str,
    test_model: bool,
    recipe: str | None = None,
    loss_curve: str | None = None,
    license: str | None = None,
    results: dict | None = None,
    eval_run: str | None = None,
    charts: list[str] = (),
    report: str | None = None,
    processor_in_repo: bool = True,
):
    """The model card of a training output; `train` is its (scrubbed) train_results.json."""
    from huggingface_hub import ModelCard, ModelCardData

    method = str(train.get("method", "full"))
    quantization = (train.get("hyperparameters") or {}).get("quantization") or {}
    # runs before "bits" was recorded said load_in_4bit
    bits = quantization.get("bits") or (4 if quantization.get("load_in_4bit", True) else 8)
    method_name = METHOD_NAMES.get(method, method).format(bits=bits)
    license_data, license_text = resolve_license(base_model_id, license, test_model)
    if base_model_id:
        base_text = f"[{base_model_id}]({hub_link(base_model_id)})"
    else:
        base_text = f"a local checkpoint, `{base_model_name}`" + (" (a randomly initialised test model)" if test_model else "")
    dataset_text = f"[{dataset_id}]({hub_link(dataset_id, 'dataset')})" if dataset_id else f"the local dataset `{dataset_name}`"

    tags = ["avlabel", "video-captioning", "dashcam", "autonomous-driving", "cosmos-reason", method]
    if weights == "adapter":
        tags += ["peft", "lora"]
    if test_model:
        tags += TEST_MODEL_TAGS
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        base_model=base_model_id,
        base_model_relation=("adapter" if weights == "adapter" else "finetune") if base_model_id else None,
        datasets=[dataset_id] if dataset_id else None,
        language=["en"],
        library_name="peft" if weights == "adapter" else "transformers",
        pipeline_tag=TASK_TYPE,
        tags=tags,
        eval_results=eval_results(results, eval_run, dataset_id or dataset_name, dataset_name) if results else None,
        **license_data,
    )
    training_rows = [
        (label, _number(train.get(key)))
        for label, key in (
            ("Training clips", "train_samples"), ("Epochs", "epochs"), ("Optimizer steps", "steps"),
            ("Hardware", "hardware"), ("Final training loss", "final_loss"), ("Evaluation loss", "eval_loss"),
            ("Prompt sha", "prompt_sha"), ("Answer format", "answer_format"),
        )
        if train.get(key) is not None
    ]
    if train.get("short_prompt") is not None:
        training_rows.append(("Prompt", "short prompt" if train["short_prompt"] else "full rubric"))
    title = repo_id.split("/")[-1] + (" (randomly initialised test model)" if test_model else "")
    summary = (
        f"A {method_name} fine-tune of {base_text} that labels dashcam clips: given a short front-camera video, "
        f"it answers with one JSON object holding the {len(FIELD_NAMES)} fields of the driving-scene label schema "
        f"(weather, lighting, road and junction type, signals, signs, manoeuvres, a safety narrative, difficulty "
        f"and flags). It was trained on {_number(train.get('train_samples'))} clips of {dataset_text} with "
        "supervised fine-tuning (TRL's `SFTTrainer`) to reproduce human annotations."
    )
    evaluation = evaluation_markdown(results, eval_run, charts, report) if results else None
    model_ref = base_model_id or f"path/to/{base_model_name}"
    caption_command = "avlabel caption --input path/to/clips --output_dir captions " + (
        f"--model {model_ref} --adapter {repo_id}" if weights == "adapter" else f"--model {repo_id}")
    if train.get("short_prompt"):
        caption_command += " --short_prompt"
    decoding = GenerationSettings()  # the snippet decodes as `avlabel caption` does, greedily
    # the snippet's frames: qwen-vl-utils given the run's sampling takes the frames sample_frames takes
    saved = (train.get("hyperparameters") or {}).get("sampling") or {}
    sampling = SamplingConfig(**{k: v for k, v in saved.items() if k in SamplingConfig.__dataclass_fields__})
    video_settings = ", ".join(f'"{name}": {getattr(sampling, name)!r}'
                               for name in ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels"))
    patch = sampling.factor // QWEN_VL_UTILS_MERGE_SIZE  # the image_patch_size giving qwen-vl-utils the run's factor
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "model_card.md.jinja"),
        title=title,
        summary=summary,
        test_model=test_model,
        weights=weights,
        method_name=method_name,
        repo_id=repo_id,
        base_model_ref=model_ref,
        processor_ref=repo_id if processor_in_repo else model_ref,
        caption_command=caption_command,
        answer_format=train.get("answer_format"),
        video_settings=video_settings,
        patch_argument="" if patch == QWEN_VL_UTILS_PATCH_SIZE else f", image_patch_size={patch}",
        repetition_penalty=decoding.repetition_penalty,
        max_new_tokens=decoding.max_new_tokens,
        prompt_kind="the short prompt" if train.get("short_prompt") else "the full rubric",
        prompt_sha=train.get("prompt_sha", "unknown"),
        field_count=len(FIELD_NAMES),
        field_list=", ".join(FIELD_NAMES),
        base_model_text=base_text,
        dataset_text=dataset_text,
        training_rows=training_rows,
        hyperparameters=_flatten(train.get("hyperparameters") or {}),
        loss_curve=loss_curve,
        recipe=recipe.strip() if recipe else None,
        evaluation=evaluation,
        license_text=license_text,
    )


# ----------------------------------------------------------------------------- evaluation-run card


def eval_card(*, repo_id: str, results: dict, eval_run: str | None, files: list[tuple[str, str]],
              model_repo: str | None = None, charts: list[str] = (), report: str | None = None):
    """The card of an evaluation run published on its own (a dataset repo of result files)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    card_data = DatasetCardData(
        pretty_name=f"Evaluation run: {', '.join(results['runs'])}",
        tags=["avlabel", "evaluation", "dashcam", "video-captioning"],
        # the files are reports, not rows: the Hub's dataset viewer has nothing to show
        viewer=False,
    )
    runs = results["runs"]
    return DatasetCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "eval_card.md.jinja"),
        title=repo_id.split("/")[-1],
        run_list=", ".join(f"`{r}`" for r in runs[:-1]) + (" and " if len(runs) > 1 else "") + f"`{runs[-1]}`",
        clips=results.get("clips", "?"),
        model_repo=model_repo,
        model_url=hub_link(model_repo) if model_repo else None,
        evaluation=evaluation_markdown(results, eval_run, charts, report, highlight_is="the published model"),
        files=files,
    )
