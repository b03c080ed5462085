"""The LLM judge through the real `openai` client against a local OpenAI-compatible server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from avlabel.core import schema
from avlabel.eval.judge import Judge, JudgeConfig, JudgeError, JudgeItem, parse_clip_answer, parse_field_answer, score_arrays
from avlabel.eval.metrics import evaluate_run
from avlabel.eval.trust import TrustConfig, judge_trust
from avlabel.eval.data import join, Prediction

sys.path.insert(0, str(Path(__file__).parent))
from eval_labels import load_label_file, perturbed, random_label, write_labels  # noqa: E402
from openai_server import SECTION, Fail, OpenAIServer, Reply, similarity_responder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = load_label_file(REPO / "tests" / "fixtures" / "reference.label.json")
FIELD_SCORE = {name: i % 5 + 1 for i, name in enumerate(schema.FIELD_NAMES)}


def field_of(request: dict) -> str:
    """The field a per-field judge prompt asks about (its question is unique to the field)."""
    prompt = request["messages"][-1]["content"]
    return next(f.name for f in schema.FIELDS if f.question in prompt)


def scripted(request: dict) -> Reply:
    return Reply(f"Scripted.\n<answer>{FIELD_SCORE[field_of(request)]}</answer>")


@pytest.fixture
def server():
    with OpenAIServer(scripted, api_keys={"test"}, models={"test-judge"}) as srv:
        yield srv


def config(srv: OpenAIServer, tmp_path: Path, **overrides) -> JudgeConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"test-judge": {"input": 2.0, "output": 8.0}}))
    return JudgeConfig(**{"judge_model": "test-judge", "judge_base_url": srv.base_url, "judge_api_key": "test",
                          "judge_cache": str(tmp_path / "cache.sqlite"), "judge_price_table": str(prices),
                          "judge_progress": False, **overrides})


def test_scores_tokens_cost_and_a_free_rerun(server, tmp_path):
    prediction = {k: v for k, v in REFERENCE.items() if k != "safety_analysis"}  # one answer missing
    items = [JudgeItem("clip", REFERENCE, prediction)]
    judge = Judge(config(server, tmp_path))
    first = judge.judge(items)
    by_field = {j.field: j for j in first}
    assert set(by_field) == set(schema.FIELD_NAMES)
    for name, j in by_field.items():
        if name == "safety_analysis":
            assert (j.status, j.score) == ("missing", 1)  # no answer: scored 1 by rule, never sent
        else:
            assert (j.status, j.score, j.reason) == ("scored", FIELD_SCORE[name], "Scripted.")
    answered = len(schema.FIELD_NAMES) - 1  # all but the missing one
    assert len(server.requests) == answered and all(field_of(r["body"]) != "safety_analysis" for r in server.requests)
    stats = judge.last
    assert (stats.calls, stats.http_requests, stats.cached) == (answered, answered, 0)
    # the tokens the server reported, and the cost from the price table
    assert (stats.prompt_tokens, stats.completion_tokens) == (server.prompt_tokens, server.completion_tokens) != (0, 0)
    assert stats.cost_usd == pytest.approx((server.prompt_tokens * 2.0 + server.completion_tokens * 8.0) / 1e6)
    assert judge.usage_of(items)["prompt_tokens"] == server.prompt_tokens

    second = judge.judge(items)
    assert len(server.requests) == answered  # nothing sent again
    assert judge.last.calls == 0 and judge.last.cached == answered and judge.last.cost_usd == 0
    assert [(j.field, j.score, j.status) for j in second] == [(j.field, j.score, j.status) for j in first]
    # a new Judge on the same cache (a later process) costs nothing either, and still knows the spend
    judge.close()
    again = Judge(config(server, tmp_path))
    again.judge(items)
    assert len(server.requests) == answered
    assert again.usage_of(items)["cost_usd"] == pytest.approx(stats.cost_usd)
    again.close()


def test_429_with_retry_after_500_and_timeout_are_retried(server, tmp_path):
    server.script.extend([Fail(429, retry_after=1), Fail(500), Reply("slow", delay=5)])
    judge = Judge(config(server, tmp_path, judge_concurrency=1, judge_timeout=1.0, judge_max_retries=4))
    (result,) = judge.judge([JudgeItem("clip", REFERENCE, REFERENCE, fields=("weather",))])
    assert (result.status, result.score) == ("scored", FIELD_SCORE["weather"])
    assert [r["retry_count"] for r in server.requests] == [0, 1, 2, 3]
    # the 429 carried Retry-After (waiting it out is the openai client's job), and the slow reply was never
    # answered: the client gave up at its timeout and asked again
    assert [(r["status"], r["retry_after"]) for r in server.requests] == [(429, 1), (500, None), (None, None), (200, None)]
    assert judge.last.http_requests == 4 and judge.last.calls == 1
    judge.close()


def test_exhausted_retries_fail_honestly_and_are_not_cached(server, tmp_path):
    server.script.extend([Fail(500), Fail(503)])
    judge = Judge(config(server, tmp_path, judge_max_retries=1))
    item = JudgeItem("clip", REFERENCE, REFERENCE, fields=("weather",))
    (failed,) = judge.judge([item])
    assert failed.status == "failed" and failed.score is None and "InternalServerError" in failed.reason
    (retried,) = judge.judge([item])  # no paid answer was received, so the rerun asks again
    assert retried.status == "scored" and len(server.requests) == 3
    judge.close()


def test_answers_without_a_score_are_retried_then_unscored(server, tmp_path):
    lighting_asked = []

    def without_tags(request):
        if field_of(request) == "weather":  # never a usable score
            return Reply("They look alike to me, I would say four.")
        lighting_asked.append(request)
        return Reply("Forgot the tags: 3") if len(lighting_asked) == 1 else scripted(request)  # once

    server.responder = without_tags
    judge = Judge(config(server, tmp_path, judge_concurrency=1, judge_parse_retries=2))
    results = {j.field: j for j in judge.judge([JudgeItem("clip", REFERENCE, REFERENCE, fields=("weather", "lighting"))])}
    assert results["weather"].status == "unscored" and results["weather"].score is None
    assert "four" in results["weather"].reason
    assert (results["lighting"].status, results["lighting"].score) == ("scored", FIELD_SCORE["lighting"])
    asked = [field_of(r["body"]) for r in server.requests]
    assert asked.count("weather") == 3 and asked.count("lighting") == 2
    # unscored stays NaN in the score arrays, never a number
    arrays = score_arrays(list(results.values()), ["clip"])
    assert np.isnan(arrays["weather"][0]) and arrays["lighting"][0] == FIELD_SCORE["lighting"]
    judge.judge([JudgeItem("clip", REFERENCE, REFERENCE, fields=("weather", "lighting"))])
    assert len(server.requests) == 5  # the paid unscored answer is cached too
    judge.close()


def test_concurrency_limit_is_never_exceeded(server, tmp_path):
    server.latency = 0.05
    rng = np.random.default_rng(0)
    items = [JudgeItem(f"c{i}", random_label(rng), random_label(rng)) for i in range(6)]
    judge = Judge(config(server, tmp_path, judge_concurrency=3))
    judge.judge(items)
    assert len(server.requests) > 30
    assert 2 <= server.max_in_flight <= 3
    assert judge.last.max_in_flight <= 3
    judge.close()


def test_per_clip_mode_one_call_per_clip_and_retries_dropped_fields(tmp_path):
    calls = []

    def drops_weather_once(request):
        reply = similarity_responder(request)
        calls.append(request)
        if len(calls) == 1:
            reply.text = "\n".join(line for line in reply.text.splitlines() if 'field="weather"' not in line)
        return reply

    rng = np.random.default_rng(1)
    prediction = perturbed(REFERENCE, rng, 0.5)
    with OpenAIServer(drops_weather_once) as srv:
        judge = Judge(config(srv, tmp_path, judge_per_clip=True))
        results = judge.judge([JudgeItem("clip", REFERENCE, prediction)])
        assert all(j.status == "scored" for j in results)
        assert len(srv.requests) == 2  # the clip, then again for the one field the answer left out
        assert "### weather" in srv.requests[1]["body"]["messages"][-1]["content"]
        assert "### lighting" not in srv.requests[1]["body"]["messages"][-1]["content"]
        per_clip_scores = {j.field: j.score for j in results}
        judge.close()
        per_field = Judge(config(srv, tmp_path))
        assert per_field.prompt_sha != judge.prompt_sha  # different prompt: separate cache entries
        assert {j.field: j.score for j in per_field.judge([JudgeItem("clip", REFERENCE, prediction)])} == per_clip_scores
        per_field.close()


def test_parsers_take_only_a_single_digit_in_tags():
    assert parse_field_answer("close match\n<answer> 4 </answer>") == (4, "close match")
    assert parse_field_answer("<answer>4.5</answer>") is None
    assert parse_field_answer("<answer>6</answer>") is None
    assert parse_field_answer("no tags, 5") is None
    text = 'a\n<answer field="weather">5</answer>\nb\n<answer field="lighting">2</answer>\n<answer field="other">3</answer>'
    assert parse_clip_answer(text, ["weather", "lighting"]) == {"weather": (5, "a"), "lighting": (2, "b")}


def test_own_prompt_files_are_checked_and_change_the_cache_key(server, tmp_path):
    bad = tmp_path / "item.txt"
    bad.write_text("Question: {question}\nHuman: {reference}\n")
    with pytest.raises(ValueError, match=r"item\.txt.*\{prediction\}"):
        Judge(config(server, tmp_path, judge_item_prompt=str(bad)))
    system = tmp_path / "system.txt"
    system.write_text("You are a strict grader of driving labels. Braces {like these} are fine.")
    judge = Judge(config(server, tmp_path, judge_system_prompt=str(system)))
    judge.judge([JudgeItem("clip", REFERENCE, REFERENCE, fields=("weather",))])
    assert server.requests[-1]["body"]["messages"][0]["content"].startswith("You are a strict grader")
    default = Judge(config(server, tmp_path))
    default.judge([JudgeItem("clip", REFERENCE, REFERENCE, fields=("weather",))])
    assert len(server.requests) == 2 and default.prompt_sha != judge.prompt_sha
    judge.close()
    default.close()


def test_missing_key_is_a_clear_error(server, tmp_path, monkeypatch, capsys):
    """Without a key, judging that needs a call stops before its progress bar; what the cache holds needs no key."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cached, new = (JudgeItem("clip", REFERENCE, REFERENCE, fields=(name,)) for name in ("weather", "lighting"))
    keyed = Judge(config(server, tmp_path))  # puts one judgment in the cache
    keyed.judge([cached])
    keyed.close()
    judge = Judge(config(server, tmp_path, judge_api_key=None, judge_progress=True))
    assert judge.judge([cached])[0].cached  # from the cache: no key asked for
    judge.check_ready([cached])
    for attempt in (lambda: judge.check_ready([cached, new]), lambda: judge.judge([cached, new])):
        with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
            attempt()
    assert capsys.readouterr().err == ""  # no progress bar was started
    assert len(server.requests) == 1
    judge.close()


@pytest.mark.parametrize("refused", [{"judge_api_key": "not-the-key"}, {"judge_model": "no-such-judge"}])
def test_a_refused_key_or_model_stops_the_run_at_once(refused, server, tmp_path):
    status = 401 if "judge_api_key" in refused else 404
    judge = Judge(config(server, tmp_path, judge_max_retries=4, **refused))
    with pytest.raises(JudgeError, match=rf"refused the request \({status}\)"):
        judge.judge([JudgeItem("clip", REFERENCE, REFERENCE, fields=("weather",))])
    assert [r["status"] for r in server.requests] == [status]  # one request: a refusal is not retried
    judge.close()


def test_an_endpoint_that_keeps_failing_stops_the_run(server, tmp_path):
    server.script.extend([Fail(500)] * len(schema.FIELD_NAMES))
    judge = Judge(config(server, tmp_path, judge_concurrency=1, judge_max_retries=0, judge_max_failures=2))
    with pytest.raises(JudgeError, match="2 judgments got no answer"):
        judge.judge([JudgeItem("clip", REFERENCE, REFERENCE)])
    # stopped after the second failure (one more may have been in flight), not after every field
    assert 2 <= len(server.requests) <= 3 and {r["status"] for r in server.requests} <= {500, None}
    judge.close()


def test_an_endpoint_that_cannot_be_reached_is_named_with_the_error_as_it_reads(server, tmp_path):
    """Nothing listens on the port: openai's own 'Connection error.' ends the line, not followed by another period."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago, and nothing listens on now
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    judge = Judge(config(server, tmp_path, judge_base_url=url, judge_concurrency=1, judge_max_retries=0,
                         judge_max_failures=1))
    with pytest.raises(JudgeError) as caught:
        judge.judge([JudgeItem("clip", REFERENCE, REFERENCE, fields=("weather",))])
    assert str(caught.value) == (f"1 judgments got no answer from {url} (judgments so far are cached; rerun to "
                                 "continue); last error: APIConnectionError: Connection error.")
    judge.close()


def test_the_server_refuses_a_request_without_a_key_as_openai_does(server):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{server.base_url}/chat/completions", method="POST",
                                     data=json.dumps({"model": "test-judge", "messages": []}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    error = json.loads(refused.value.read())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"


def test_trust_checks_separate_a_careful_judge_from_a_lenient_one(tmp_path):
    rng = np.random.default_rng(2)
    references = {f"c{i}": random_label(rng) for i in range(12)}
    predictions = {k: Prediction(k, schema.normalize_label(perturbed(v, rng, 0.5)), True) for k, v in references.items()}
    run = join("model", references, predictions)
    items = [JudgeItem(c, references[c], predictions[c].label) for c in run.clip_ids]
    trust_config = TrustConfig(clips=12, repeats=2)

    def checks(srv: OpenAIServer, name: str) -> dict:
        judge = Judge(config(srv, tmp_path / name, judge_per_clip=True))  # one call per clip keeps this quick
        report = judge_trust(judge, [run], {"model": judge.judge(items)}, {"model": evaluate_run(run)}, trust_config)
        judge.close()
        return report

    with OpenAIServer() as srv:  # scores by similarity of the two answers
        careful = checks(srv, "careful")
    weather = careful["fields"]["weather"]
    assert weather["identity"] == {"mean": 5, "n": 12} and weather["shuffled"]["mean"] <= 2.5
    assert weather["swap"]["n"] == 12 and weather["repeat"]["n"] == 12
    assert weather["agreement"]["spearman"] > 0.9 and weather["verdict"] == "trustworthy"
    assert careful["fields"]["driving_difficulty"]["verdict"] == "trustworthy"

    def lenient(request):
        fields = SECTION.findall(request["messages"][-1]["content"])
        return Reply("\n".join(f'Seems about right.\n<answer field="{name}">4</answer>' for name in fields))

    with OpenAIServer(lenient) as srv:
        report = checks(srv, "lenient")
    for name, entry in report["fields"].items():
        assert entry["verdict"] == "doubtful", name
        assert any("identity" in r for r in entry["reasons"]) and any("shuffled" in r for r in entry["reasons"])
    assert report["fields"]["weather"]["agreement"]["spearman"] is None  # constant scores: undefined


@pytest.mark.slow
def test_interrupted_command_resumes_without_repeating_calls(tmp_path):
    """SIGINT in the middle of `python -m eval judge`, then the same command again."""
    rng = np.random.default_rng(3)
    references = {f"clip{i:02d}": random_label(rng) for i in range(10)}
    write_labels(tmp_path / "refs", references)
    predictions = {k: perturbed(v, rng, 0.5) for k, v in references.items()}
    write_labels(tmp_path / "preds", predictions)
    # the judge asks once per distinct (field, human answer, model answer)
    distinct_questions = len({(n, json.dumps(references[c][n]), json.dumps(predictions[c][n]))
                              for c in references for n in schema.FIELD_NAMES})
    interrupted = False

    def held_after_twenty(request):
        """Answers after the 20th wait until the interrupt has surely come, however busy the machine: otherwise
        the command could finish first and the test would see exit code 0, not the interrupt's 130."""
        reply = similarity_responder(request)
        if not interrupted and len(srv.requests) > 20:
            reply.delay = 10.0
        return reply

    with OpenAIServer(held_after_twenty, latency=0.05) as srv:
        command = [sys.executable, "-m", "eval", "judge", "--predictions", str(tmp_path / "preds"),
                   "--references", str(tmp_path / "refs"), "--output_dir", str(tmp_path / "out"),
                   "--judge_model", "test-judge", "--judge_base_url", srv.base_url, "--judge_api_key", "test",
                   "--judge_cache", str(tmp_path / "cache.sqlite"), "--judge_concurrency", "8", "--no_judge_progress"]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(srv.requests) < 20 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        interrupted = True
        assert process.returncode == 130, stderr
        assert "run the same command again" in stderr
        first = len(srv.requests)
        assert 20 <= first < distinct_questions

        import sqlite3

        with sqlite3.connect(tmp_path / "cache.sqlite") as db:
            saved = db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
        assert first - 8 <= saved <= first  # at most the calls in flight at the interrupt were lost

        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert len(srv.requests) - first == distinct_questions - saved  # only what was not saved was asked again
        assert len({json.dumps(r["body"]["messages"]) for r in srv.requests}) == distinct_questions
    summary = json.loads((tmp_path / "out" / "judge_summary.json").read_text())
    assert summary["this_run"]["calls"] == distinct_questions - saved
    lines = (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()
    assert len(lines) == len(references) * len(schema.FIELD_NAMES) and all(json.loads(line)["status"] == "scored" for line in lines)
