"""Constrained decoding that always finishes (infer/constrained.py) and per-field confidence (infer/confidence.py).

The grammar is checked against what training writes; the closing rule against random
decoding under the grammar (many budgets, two tokenizers); the command against the
untrained tiny model (every record valid at the smallest budget it accepts and at the
recipe's) and a briefly fine-tuned one (constrained greedy equals free greedy wherever
the free answer is valid); confidence against one forward pass over prompt and answer.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

from avlabel.core.errors import UsageError
from avlabel.core.schema import FIELD_NAMES, FIELDS_BY_NAME, TEXT_FIELD_NAMES, check_label, clean_text
from avlabel.infer import constrained
from avlabel.infer.confidence import value_spans
from avlabel.infer.parse import parse_output
from constrained_reference import batched_decode, per_row_decode
from eval_labels import load_label_file

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "infer" / "tiny.yaml"
TINY_SFT = REPO / "recipes" / "tiny" / "sft.yaml"


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's small products are slower on a shared pool
    yield
    torch.set_num_threads(before)


def _caption(model, out, **overrides) -> list[dict]:
    from avlabel.infer.caption import main, make_parser

    argv = ["--config", str(TINY_RECIPE), "--model", str(model), "--output_dir", str(out)]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    main(*make_parser().parse_args_and_config(args=argv))
    return [json.loads(line) for line in (Path(out) / "captions.jsonl").read_text(encoding="utf-8").splitlines()]


def _json_of(text: str) -> dict:
    """The label object of an answer in either layout, strictly parsed."""
    return json.loads(text.removeprefix("```json\n").removesuffix("\n```"))


def _synthetic_labels(raw_dir: Path) -> list[dict]:
    return [load_label_file(path) for path in sorted((raw_dir / "metas").glob("*.label.json"))]


# ----------------------------------------------------------------------------- grammar


def _accepts(grammar, text: str) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammar)
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize("answer_format", ["plain", "fenced"])
def test_grammar_accepts_what_training_writes_and_nothing_invalid(tiny_model_dir, synthetic_raw_dir, answer_format):
    from transformers import AutoTokenizer

    from avlabel.train.collator import format_answer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    labels = _synthetic_labels(synthetic_raw_dir)
    config = constrained.AnswerConfig.from_labels(labels, answer_format)
    grammar = constrained.compile_grammar(constrained.tokenizer_info(tokenizer), config)
    most = config.max_chars["road_type"]
    edge = {**labels[0], "road_conditions": 'Wet "slick" \\ asphalt\nnear the curb', "traffic_sign": "Vitesse limitée 東 🚗",
            "additional_traffic_rules": "", "interactive_expanded_metaaction": ["Yield to VRUs", "Vehicle following"]}
    for label in [*labels, edge, {**edge, "interactive_expanded_metaaction": []}]:
        assert _accepts(grammar, format_answer(label, answer_format)), format_answer(label, answer_format)

    other = "fenced" if answer_format == "plain" else "plain"
    invalid = {
        "the other layout": format_answer(labels[0], other),
        "blank required text": format_answer({**labels[0], "road_type": " \u3000"}, answer_format),
        "text over its limit": format_answer({**labels[0], "road_type": "x" * (most + 1)}, answer_format),
        "a \\u escape": format_answer(labels[0], answer_format).replace("Dry", "\\u0044ry", 1),
        "an unknown category": format_answer({**labels[0], "weather": "Sleet"}, answer_format),
        "fields out of order": format_answer(labels[0], answer_format).replace('"weather"', '"weathr"'),
    }
    assert "Dry" in format_answer(labels[0], answer_format)  # the \u case changes something
    for what, text in invalid.items():
        assert not _accepts(grammar, text), what
    assert _accepts(grammar, format_answer({**labels[0], "road_type": "\u00e9" * most}, answer_format))  # characters, not bytes


def test_blank_first_characters_are_exactly_what_check_label_strips():
    """The grammar's non-blank first character excludes what str.isspace calls space: the same set clean_text strips."""
    blank = {c for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000 and not clean_text(chr(c))}
    assert blank == {c for c in range(sys.maxunicode + 1) if chr(c).isspace()}


# ----------------------------------------------------------------------------- closing within the budget


def _decode_randomly(plan, grammar, vocab_size: int, budget: int, rng: random.Random):
    """Random logits under the grammar, every token through a closer: what a confused model writes."""
    import torch
    import xgrammar as xgr

    matcher, closer = xgr.GrammarMatcher(grammar), plan.closer(budget)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    written = []
    while len(written) < budget and not matcher.is_terminated():
        matcher.fill_next_token_bitmask(bitmask, 0)
        logits = torch.randn(1, vocab_size, generator=generator) * 4
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        token = closer.next_token(int(logits.argmax()))
        assert matcher.accept_token(token), (token, written)
        written.append(token)
    return written, closer


def _check_closing(tokenizer, answer_format: str, trials: int, seed: int):
    config = constrained.AnswerConfig(answer_format, dict.fromkeys(TEXT_FIELD_NAMES, 40))
    info = constrained.tokenizer_info(tokenizer, stop_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    grammar = constrained.compile_grammar(info, config)
    plan = constrained.closing_plan(tokenizer, config, constrained.token_bytes(info), info.stop_token_ids)
    shortest = check_label(_json_of(plan.tail_texts[0]))[0]
    assert check_label(_json_of(plan.tail_texts[0]))[1] == {} and plan.min_budget == len(tokenizer.encode(plan.tail_texts[0], add_special_tokens=False))
    rng = random.Random(seed)
    seen = {"cut": 0, "uncut": 0, "cut inside a value": 0, "length limit": 0, "non-ASCII": 0}
    for trial in range(trials):
        budget = plan.min_budget + rng.choice([0, 1, 3, 10, 40, 120, 400])
        written, closer = _decode_randomly(plan, grammar, info.vocab_size, budget, rng)
        text = b"".join(plan.token_bytes[t] for t in written).decode("utf-8")  # whole characters only
        assert len(written) <= budget
        parsed = parse_output(text)
        assert parsed.valid, (budget, text, parsed.errors)
        assert check_label(_json_of(text))[1] == {}
        cut = {name for name, why in closer.cut_fields.items() if why == constrained.CUT_BY_BUDGET}
        if cut:  # the budget cut a run of fields to the end: the first one wherever it stood, the rest shortest
            first = FIELD_NAMES.index(min(cut, key=FIELD_NAMES.index))
            assert cut == set(FIELD_NAMES[first:])
            assert all(parsed.label[name] == shortest[name] for name in FIELD_NAMES[first + 1:])
            seen["cut inside a value"] += parsed.label[FIELD_NAMES[first]] != shortest[FIELD_NAMES[first]]
        seen["cut" if cut else "uncut"] += 1
        for name, why in closer.cut_fields.items():
            if why == constrained.CUT_BY_LENGTH:
                assert len(_json_of(text)[name]) == 40
                seen["length limit"] += 1
        seen["non-ASCII"] += not text.isascii()
    assert all(seen.values()), seen  # every path was taken


@pytest.mark.slow
def test_closing_always_ends_in_a_valid_label_within_budget(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for answer_format in ("plain", "fenced"):
        _check_closing(tokenizer, answer_format, trials=120, seed=0)


@pytest.mark.slow
def test_closing_with_the_real_qwen_vocabulary():
    """Qwen's 151k tokens: multi-byte pieces, punctuation merged across a value's end and the next key."""
    from avlabel.demo.tiny_model import build_tokenizer

    _check_closing(build_tokenizer("qwen2_5_vl", "qwen"), "fenced", trials=12, seed=1)  # about 1.7 s a trial


@pytest.mark.parametrize("tokenizer_kind", ["small", pytest.param("qwen", marks=pytest.mark.slow)])
def test_batched_path_writes_what_the_per_row_path_writes(tokenizer_kind):
    """The engine's fast path (the grammar without text limits and the limits kept on the host, batched mask
    fill, closers deferred past the forward pass, forced tokens written on the device, the closers' shortcuts)
    writes the same tokens and cut fields as the engine's old per-row path with the bounded grammar."""
    import torch

    from avlabel.demo.tiny_model import build_tokenizer

    tokenizer = build_tokenizer("qwen2_5_vl", tokenizer_kind)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # limits small enough that a token opening a string can overrun one
    config = constrained.AnswerConfig("fenced", {name: (3, 6, 40)[i % 3] for i, name in enumerate(TEXT_FIELD_NAMES)})
    info = constrained.tokenizer_info(tokenizer, stop_ids=[stop, tokenizer.pad_token_id])
    grammar = constrained.compile_grammar(info, config)
    plan = constrained.closing_plan(tokenizer, config, constrained.token_bytes(info), info.stop_token_ids)
    assert plan.limits_text  # so the engine compiles the grammar without them
    unbounded = constrained.compile_grammar(info, config, bounded=False)
    # Qwen's 151k tokens make the bounded grammar's masks slow (the reason for the unbounded one): fewer rows
    rows, extra = (12, (0, 7, 60, 400)) if tokenizer_kind == "small" else (4, (0, 60, 400))
    seen = {"forced": 0, "length limit": 0, "within budget": 0}
    for budget in (plan.min_budget + n for n in extra):
        def logits_at(step, budget=budget):  # a confused model: random scores, the same for both paths
            generator = torch.Generator().manual_seed(budget * 10_000 + step)
            return torch.randn(rows, info.vocab_size, generator=generator) * 4

        expected = per_row_decode(plan, grammar, info.vocab_size, budget, rows, logits_at)[:2]
        assert batched_decode(plan, unbounded, info.vocab_size, budget, rows, logits_at)[:2] == expected
        written, cut = expected
        for tokens in written:  # the reference is itself right: a valid label within the budget
            assert len(tokens) <= budget and parse_output(b"".join(plan.token_bytes[t] for t in tokens).decode()).valid
        seen["forced"] += sum(constrained.CUT_BY_BUDGET in c.values() for c in cut)
        seen["length limit"] += sum(constrained.CUT_BY_LENGTH in c.values() for c in cut)
        seen["within budget"] += sum(constrained.CUT_BY_BUDGET not in c.values() for c in cut)
    assert all(seen.values()), seen  # every path was taken


def test_text_limits_stay_in_the_grammar_for_a_token_that_spans_a_field_head():
    """The host keeps text limits only where that is exact: a token holding a whole field head could write
    into two strings at once, so with such a vocabulary the engine keeps the bounded grammar."""
    config = constrained.AnswerConfig("plain")

    def plan_of(pieces):
        return constrained.ClosingPlan(config, lambda text: list(text.encode()), pieces)

    byte_pieces = [bytes([b]) for b in range(256)]
    head = b', "road_type": '  # a free-text field's head in the plain layout
    assert plan_of(byte_pieces + [b'", "x']).limits_text
    assert not plan_of(byte_pieces + [b'ab"' + head + b'"cd']).limits_text


# ----------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_untrained_model_gives_valid_records_at_the_smallest_budget_and_the_default(
    tiny_model_dir, synthetic_dataset_dir, tmp_path, one_thread
):
    """Acceptance: 20 clips, --constrained, the untrained tiny model: every record valid; cut fields named."""
    import yaml
    from transformers import AutoTokenizer

    from avlabel.eval.data import load_predictions

    config = constrained.AnswerConfig.for_model(tiny_model_dir, answer_format="plain")
    smallest = constrained.minimum_budget(AutoTokenizer.from_pretrained(tiny_model_dir), config)
    default = yaml.safe_load(TINY_RECIPE.read_text())["max_new_tokens"]
    common = {"input": synthetic_dataset_dir, "split": "train", "constrained": "true"}
    with pytest.raises(UsageError, match=f"below {smallest},") as refused:
        _caption(tiny_model_dir, tmp_path / "refused", max_new_tokens=smallest - 1, **common)
    assert "\n" not in str(refused.value) and f"--max_new_tokens {smallest}" in str(refused.value)

    for budget in (smallest, default):
        out = tmp_path / f"budget_{budget}"
        records = _caption(tiny_model_dir, out, max_new_tokens=budget, **common)
        assert len(records) == 20
        predictions, _ = load_predictions(out)
        for record in records:
            assert record["valid"] and record["errors"] == {} and record["completion_tokens"] <= budget
            assert check_label(_json_of(record["raw"])) == (record["label"], {})  # strict JSON, every field valid
            cut = record["cut_fields"]
            assert cut, "the untrained model never closes its text by itself"
            assert set(cut) <= set(FIELD_NAMES) and set(cut.values()) <= {constrained.CUT_BY_BUDGET, constrained.CUT_BY_LENGTH}
            # metrics read cut fields as missing; the rest are answers, with their confidence
            kept = [name for name in record["label"] if name not in cut]
            assert sorted(predictions[record["clip_id"]].label) == sorted(kept)
            assert set(record["confidence"]) | set(record["text_mean_logprob"]) == set(kept)
        if budget == smallest:  # nothing but the shortest label fits: every field is cut
            assert all(set(r["cut_fields"]) == set(FIELD_NAMES) for r in records)
        else:  # the model's own closed-set answers come first; its text runs until the budget closes it
            assert all(r["cut_fields"].get("safety_analysis") == constrained.CUT_BY_BUDGET for r in records)
            assert all("weather" not in r["cut_fields"] for r in records)


@pytest.fixture(scope="module")
def fine_tuned(tiny_model_dir, synthetic_dataset_dir, tmp_path_factory):
    """The tiny model fine-tuned as the demo does, briefly (120 steps on 4 clips): many of its answers are valid."""
    from avlabel.train.sft import train

    out = tmp_path_factory.mktemp("fine_tuned")
    run = train(TINY_SFT, {
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(synthetic_dataset_dir), "output_dir": str(out),
        "max_steps": 120, "max_train_samples": 4, "per_device_train_batch_size": 2, "learning_rate": 3e-3,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "eval_strategy": "no", "save_strategy": "no",
        "report_to": ["none"],
    })
    return run / "merged"


@pytest.fixture(scope="module")
def fine_tuned_captions(fine_tuned, synthetic_dataset_dir, tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fine_tuned_captions")
    common = {"input": synthetic_dataset_dir, "split": "train"}
    yield {mode: _caption(fine_tuned, out / mode, constrained=str(mode == "constrained").lower(), **common)
           for mode in ("free", "constrained")}
    torch.set_num_threads(before)


@pytest.mark.slow
def test_fine_tuned_model_saves_its_layout_and_text_limits(fine_tuned, synthetic_dataset_dir):
    from avlabel.core.loading import load_clip_dataset
    from avlabel.core.schema import row_to_label

    rows = load_clip_dataset(synthetic_dataset_dir, "train").select(range(4))  # the 4 clips it was trained on
    saved = json.loads((fine_tuned / constrained.ANSWER_FILE).read_text())
    longest = {name: max(len(row_to_label(row)[name] or "") for row in rows) for name in TEXT_FIELD_NAMES}
    assert saved["answer_format"] == "plain"  # recipes/tiny/sft.yaml's
    assert saved["max_chars"] == {name: max(constrained.MIN_MAX_CHARS, 2 * n) for name, n in longest.items()}


@pytest.mark.slow
def test_constrained_greedy_equals_free_greedy_wherever_the_free_answer_is_valid(fine_tuned_captions):
    """Acceptance: the grammar and the closing rule change nothing a valid answer would have been."""
    free, bound = fine_tuned_captions["free"], fine_tuned_captions["constrained"]
    valid = [(a, b) for a, b in zip(free, bound) if a["valid"]]
    assert 5 <= len(valid) < len(free)  # enough valid answers to compare, and invalid ones the grammar fixes
    for a, b in valid:
        assert (b["raw"], b["label"], b["cut_fields"]) == (a["raw"], a["label"], {})
        assert (b["confidence"], b["text_mean_logprob"]) == (a["confidence"], a["text_mean_logprob"])
    assert all(b["valid"] for b in bound)


# ----------------------------------------------------------------------------- confidence


def _recomputed(model_dir: Path, record: dict, constrained_run: bool) -> dict:
    """A record's confidence from one forward pass of a freshly loaded model over its prompt and its answer."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from avlabel.core.prompts import load_prompts
    from avlabel.core.sampling import sample_frames
    from avlabel.infer.engine import CaptionEngine
    from avlabel.infer.settings import GenerationSettings

    processor = AutoProcessor.from_pretrained(model_dir)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=400, constrained=constrained_run, answer_format="plain")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()  # as tiny.yaml loads it
    engine = CaptionEngine(model, processor, load_prompts(short=True), settings, batch_size=1,
                           sampling=settings.sampling(model.config, str(model_dir)), answer=settings.answer(str(model_dir)))
    item = engine.prepare(sample_frames(record["video"], engine.sampling))
    tokens = engine.generate([item])[0].tokens  # the answer's tokens (the record keeps its text)
    assert processor.tokenizer.decode(tokens, skip_special_tokens=True) == record["raw"]

    reference = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()  # transformers' attention
    prompt = item["input_ids"].shape[1]
    answer = torch.tensor([tokens])
    inputs = {**item, "input_ids": torch.cat([item["input_ids"], answer], dim=1)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in item:
        inputs["mm_token_type_ids"] = torch.nn.functional.pad(item["mm_token_type_ids"], (0, len(tokens)))
    with torch.no_grad():
        logits = reference(**inputs).logits[0, prompt - 1 : -1].float()
    logprobs = logits.log_softmax(-1).gather(1, answer.T).squeeze(1).tolist()

    # each value's characters, found in the raw text as json.dumps writes it after its key
    raw, values = record["raw"], json.loads(record["raw"])
    ends = [len(processor.tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)) for i in range(len(tokens))]
    starts = [0, *ends[:-1]]
    probability, text_mean = {}, {}
    for name in set(record["label"]) - set(record["cut_fields"]):
        key, value = f'"{name}": ', json.dumps(values[name], ensure_ascii=False)
        start = raw.index(key + value) + len(key)
        mine = [lp for lp, a, b in zip(logprobs, starts, ends) if a < start + len(value) and b > start]
        if FIELDS_BY_NAME[name].closed:
            probability[name] = math.exp(sum(mine))
        else:
            text_mean[name] = sum(mine) / len(mine)
    return {"confidence": probability, "text_mean_logprob": text_mean}


@pytest.mark.slow
def test_confidence_equals_one_forward_pass_over_prompt_and_answer(fine_tuned, fine_tuned_captions, one_thread):
    """Acceptance (issue 19): per-field confidence, free and constrained, recomputed independently."""
    free = next(r for r in fine_tuned_captions["free"] if r["valid"])
    # a constrained answer the grammar changed (the free one was invalid)
    bound = next(b for a, b in zip(fine_tuned_captions["free"], fine_tuned_captions["constrained"]) if not a["valid"])
    for record, constrained_run in ((free, False), (bound, True)):
        expected = _recomputed(fine_tuned, record, constrained_run)
        for kind in ("confidence", "text_mean_logprob"):
            assert set(record[kind]) == set(expected[kind]) and record[kind], kind
        for name, p in expected["confidence"].items():
            assert math.log(record["confidence"][name]) == pytest.approx(math.log(p), abs=1e-4), name
        for name, mean in expected["text_mean_logprob"].items():
            assert record["text_mean_logprob"][name] == pytest.approx(mean, abs=1e-4), name
        assert record["clip_confidence"] == min(record["confidence"].values())


def test_value_spans_find_each_top_level_value():
    label = {"weather": "Overcast", "traffic_sign": 'A "stop" sign, {odd}', "interactive_expanded_metaaction": ["Yield to VRUs"],
             "driving_difficulty": 2, "additional_map_rules": None}
    for text in (json.dumps(label), "<think>{not this}</think>```json\n" + json.dumps(label, indent=2) + "\n```"):
        data = text.encode()
        spans = value_spans(data)
        assert {name: json.loads(data[a:b]) for name, (a, b) in spans.items()} == label
    cut = json.dumps(label)[:-20].encode()  # stops inside the last value: only the finished ones
    assert list(value_spans(cut)) == ["weather", "traffic_sign", "interactive_expanded_metaaction", "driving_difficulty"]
    assert value_spans(b"no object here") == {}


def test_answer_config_precedence_and_bad_files(tmp_path):
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir()
    adapter.mkdir()
    assert constrained.AnswerConfig.for_model(model) == constrained.AnswerConfig()  # nothing saved: the defaults
    labels = [{"road_type": "Highway", "safety_analysis": "x" * 100}, {"road_type": None, "safety_analysis": "y"}]
    derived = constrained.AnswerConfig.from_labels(labels, "plain")
    assert derived.max_chars["road_type"] == constrained.MIN_MAX_CHARS and derived.max_chars["safety_analysis"] == 200
    derived.save(model)
    assert constrained.AnswerConfig.for_model(adapter, model) == derived
    constrained.AnswerConfig("fenced").save(adapter)  # an adapter's own wins over its base model's
    assert constrained.AnswerConfig.for_model(adapter, model).answer_format == "fenced"
    overridden = constrained.AnswerConfig.for_model(model, answer_format="fenced", max_text_chars=77)
    assert overridden.answer_format == "fenced" and set(overridden.max_chars.values()) == {77}
    (model / constrained.ANSWER_FILE).write_text('{"answer_format": "yaml"}')
    with pytest.raises(ValueError, match=f"{constrained.ANSWER_FILE}: not a valid answer config"):
        constrained.AnswerConfig.for_model(model)
    with pytest.raises(UsageError, match="--max_text_chars 2: give at least 3"):
        constrained.AnswerConfig.for_model(adapter, max_text_chars=2)
