"""The LLM judge: how closely a model's answer matches the human one, per field, from 1 to 5.

As in the recipe, the judge reads the field's question, the human answer and the model answer
(never the video) and ends with the score inside `<answer>` tags. Unlike the recipe's serial
loop it is built to be rerun cheaply and safely:

* any OpenAI-compatible endpoint through the `openai` client (base URL and key from the
  arguments or OPENAI_BASE_URL / OPENAI_API_KEY): GPT-5 by default, or a local vLLM/Ollama;
* asynchronous with at most `judge_concurrency` requests in flight;
* retries on 408/409/429/5xx, timeouts and dropped connections with exponential backoff and
  jitter that honours Retry-After: this is the `openai` client's own retry loop
  (`max_retries`), so it is not written again here;
* a SQLite cache keyed by (judge model, prompt hash, field, reference, prediction, repeat):
  each judgment is committed as soon as it arrives, so an interrupted run loses nothing and a
  rerun, or another model giving the same answer, costs no call;
* optionally one call per clip for all its fields (`judge_per_clip`);
* token counts and cost from a price table (eval/prices.json or your own);
* an answer without a parsable score is asked again (`judge_parse_retries`) and then recorded
  as unscored: a judgment never gets a number the judge did not give.

A field the model did not produce at all is not sent: it scores 1 (the rubric's "no agreement")
with status "missing", so failing to answer never raises a model's mean.

Command: `avlabel judge --predictions OUT/captions --references DATASET --output_dir DIR`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sqlite3
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from avlabel.core import schema
from avlabel.core.loading import cache_root

from .data import Run, RunArguments, read_run, render_value

PROMPT_DIR = Path(__file__).parent / "prompts"
DEFAULT_PRICE_TABLE = Path(__file__).parent / "prices.json"
def default_cache() -> Path:
    """$AVLABEL_JUDGE_CACHE, else judge_cache.sqlite in avlabel's cache folder (read when a judge starts, so a
    variable set after import counts)."""
    return Path(os.environ.get("AVLABEL_JUDGE_CACHE", cache_root() / "judge_cache.sqlite"))
# the rubric's scale (prompts/judge_system.txt): 1 no agreement ... 5 the same answer, one digit each
SCORE_RANGE = (1, 5)
MISSING_SCORE = SCORE_RANGE[0]  # the rubric's "no agreement", given without a call when the model gave no answer

_SCORE = f"([{SCORE_RANGE[0]}-{SCORE_RANGE[1]}])"
FIELD_ANSWER = re.compile(rf"<answer>\s*{_SCORE}\s*</answer>", re.IGNORECASE)
CLIP_ANSWER = re.compile(rf"<answer\s+field\s*=\s*[\"']?([A-Za-z_]+)[\"']?\s*>\s*{_SCORE}\s*</answer>", re.IGNORECASE)


class JudgeError(ValueError):
    """The judge cannot go on (bad key, unknown model, endpoint down); judgments so far are cached. A
    ValueError, as every error a user can cause: the command prints it as one line."""


@dataclass
class JudgeConfig:
    judge_model: str = field(default="gpt-5", metadata={"help": "model name at the endpoint (the recipe used GPT-5)"})
    judge_base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible base URL, e.g. http://localhost:8000/v1 for vLLM; default OPENAI_BASE_URL or OpenAI"})
    judge_api_key: str | None = field(default=None, metadata={"help": "API key; default OPENAI_API_KEY (any string for a local server that ignores it)"})
    judge_concurrency: int = field(default=64, metadata={"help": "most requests in flight at once"})
    judge_timeout: float = field(default=120.0, metadata={"help": "seconds before a request is abandoned and retried"})
    judge_max_retries: int = field(default=6, metadata={"help": "retries of a request after 408/409/429/5xx, timeouts and connection errors (backoff with jitter, Retry-After honoured)"})
    judge_parse_retries: int = field(default=2, metadata={"help": "times a question is asked again when the answer has no score; then it is recorded as unscored"})
    judge_max_failures: int = field(default=100, metadata={"help": "stop after this many judgments got no answer at all (endpoint down); they are not cached, a rerun retries them"})
    judge_per_clip: bool = field(default=False, metadata={"help": "judge all fields of a clip in one call (fewer, longer calls) instead of one call per field as the recipe does"})
    judge_cache: str | None = field(default=None, metadata={
        "help": "SQLite cache of judgments (default: $AVLABEL_JUDGE_CACHE, else judge_cache.sqlite in $AVLABEL_CACHE, "
                "~/.cache/avlabel)"})
    judge_system_prompt: str | None = field(default=None, metadata={"help": "file with your own system prompt (the rubric)"})
    judge_item_prompt: str | None = field(default=None, metadata={"help": "file with your own rendering of one question; must contain {question}, {reference} and {prediction}"})
    judge_field_prompt: str | None = field(default=None, metadata={"help": "file with your own per-field user prompt; must contain {item}"})
    judge_clip_prompt: str | None = field(default=None, metadata={"help": "file with your own per-clip user prompt; must contain {items}, {first_field} and {field_names}"})
    judge_price_table: str | None = field(default=None, metadata={"help": "JSON {model: {input, output}} in USD per million tokens; default eval/prices.json"})
    judge_temperature: float | None = field(default=None, metadata={"help": "sampling temperature; default: the endpoint's (GPT-5 accepts no other)"})
    judge_progress: bool = field(default=True, metadata={"help": "show a progress bar"})


# --------------------------------------------------------------------------- prompts

_PLACEHOLDERS = {
    "system": (),
    "item": ("{question}", "{reference}", "{prediction}"),
    "field": ("{item}",),
    "clip": ("{items}", "{first_field}", "{field_names}"),
}


@dataclass(frozen=True)
class JudgePrompts:
    system: str
    item: str
    field: str
    clip: str

    @classmethod
    def load(cls, config: JudgeConfig) -> "JudgePrompts":
        texts = {}
        for part, needed in _PLACEHOLDERS.items():
            path = Path(getattr(config, f"judge_{part}_prompt") or PROMPT_DIR / f"judge_{part}.txt")
            text = path.read_text(encoding="utf-8").strip()
            absent = [p for p in needed if p not in text]
            if absent:
                raise ValueError(f"{path}: the {part} prompt must contain {', '.join(absent)}")
            texts[part] = text
        return cls(**texts)

    def sha(self, per_clip: bool) -> str:
        """Hash of every text the judge sees besides the answers: the cache key's prompt part."""
        parts = [self.system, self.item, self.clip if per_clip else self.field]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]

    def render_item(self, name: str, reference: str, prediction: str) -> str:
        # plain replace, not str.format: answers and user prompts may contain braces
        return (self.item.replace("{question}", schema.FIELDS_BY_NAME[name].question)
                .replace("{reference}", reference).replace("{prediction}", prediction))

    def messages(self, tasks: Sequence["_Task"], per_clip: bool) -> list[dict[str, str]]:
        if per_clip:
            items = "\n\n".join(f"### {t.field}\n{self.render_item(t.field, t.reference, t.prediction)}" for t in tasks)
            user = (self.clip.replace("{items}", items).replace("{first_field}", tasks[0].field)
                    .replace("{field_names}", ", ".join(t.field for t in tasks)))
        else:
            (task,) = tasks
            user = self.field.replace("{item}", self.render_item(task.field, task.reference, task.prediction))
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def parse_field_answer(text: str) -> tuple[int, str] | None:
    """(score, reason) from a per-field answer, or None when there is no single score of SCORE_RANGE in tags."""
    matches = list(FIELD_ANSWER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return int(last.group(1)), text[: last.start()].strip()


def parse_clip_answer(text: str, fields: Iterable[str]) -> dict[str, tuple[int, str]]:
    """{field: (score, reason)} for the fields a per-clip answer scored (the text since the previous tag is the reason)."""
    wanted, found, start = set(fields), {}, 0
    for match in CLIP_ANSWER.finditer(text):
        name = match.group(1)
        if name in wanted:
            found[name] = (int(match.group(2)), text[start: match.start()].strip())
        start = match.end()
    return found


# --------------------------------------------------------------------------- prices


def load_price_table(path: str | Path | None = None) -> dict[str, dict[str, float]]:
    path = Path(path or DEFAULT_PRICE_TABLE)
    table = json.loads(path.read_text(encoding="utf-8"))
    prices = {}
    for model, entry in table.items():
        if model.startswith("_"):  # comments
            continue
        if not isinstance(entry, dict) or not {"input", "output"} <= set(entry):
            raise ValueError(f"{path}: {model!r} needs input and output prices (USD per million tokens)")
        prices[model] = {"input": float(entry["input"]), "output": float(entry["output"])}
    return prices


def price_for(model: str, prices: Mapping[str, Mapping[str, float]]) -> Mapping[str, float] | None:
    """The entry for the model, or for the longest name it starts with (dated snapshots), else None."""
    if model in prices:
        return prices[model]
    prefixes = [name for name in prices if model.startswith(name)]
    return prices[max(prefixes, key=len)] if prefixes else None


def cost_usd(prompt_tokens: int, completion_tokens: int, price: Mapping[str, float] | None) -> float | None:
    if price is None:
        return None
    return (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6


# --------------------------------------------------------------------------- cache


class JudgeCache:
    """Judgments on disk, one row per (model, prompt, field, reference, prediction, repeat).

    Rows carry the id and token totals of the call that produced them (a per-clip call covers
    several rows), so the cost of any set of judgments can be summed without double counting.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        # WAL + NORMAL: a commit per judgment stays cheap and survives a killed process
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS judgments (
                key TEXT PRIMARY KEY, model TEXT, prompt_sha TEXT, field TEXT, reference TEXT,
                prediction TEXT, repeat INTEGER, score INTEGER, status TEXT, reason TEXT,
                call_id TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"""
        )
        self.db.commit()

    @staticmethod
    def key(model: str, prompt_sha: str, name: str, reference: str, prediction: str, repeat: int) -> str:
        return hashlib.sha256(json.dumps([model, prompt_sha, name, reference, prediction, repeat]).encode()).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, sqlite3.Row]:
        self.db.row_factory = sqlite3.Row
        found = {}
        for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            chunk = keys[start: start + 500]
            query = f"SELECT * FROM judgments WHERE key IN ({','.join('?' * len(chunk))})"
            found.update((row["key"], row) for row in self.db.execute(query, chunk))
        return found

    def put(self, rows: Sequence[dict[str, Any]]) -> None:
        columns = ("key", "model", "prompt_sha", "field", "reference", "prediction", "repeat", "score", "status",
                   "reason", "call_id", "prompt_tokens", "completion_tokens", "created")
        self.db.executemany(
            f"INSERT OR REPLACE INTO judgments ({','.join(columns)}) VALUES ({','.join('?' * len(columns))})",
            [tuple(row[c] for c in columns) for row in rows],
        )
        self.db.commit()

    def usage(self, keys: Sequence[str]) -> tuple[int, int]:
        """Prompt and completion tokens of the calls behind these judgments, each call once."""
        calls = {row["call_id"]: (row["prompt_tokens"], row["completion_tokens"]) for row in self.get_many(keys).values()}
        return sum(p for p, _ in calls.values()), sum(c for _, c in calls.values())

    def close(self) -> None:
        self.db.close()


# --------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class JudgeItem:
    """One comparison to judge: reference and prediction labels (dicts of field values)."""

    clip_id: str
    reference: Mapping[str, Any]
    prediction: Mapping[str, Any]
    repeat: int = 0  # >0 asks the same question again (repeat-variance check)
    fields: tuple[str, ...] | None = None  # default: every schema field


@dataclass
class Judgment:
    clip_id: str
    field: str
    repeat: int
    score: int | None
    status: str  # "scored" | "unscored" (no usable score) | "missing" (model gave no answer) | "failed" (no reply)
    reason: str = ""
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JudgeStats:
    """What one `judge()` call did. Tokens and cost count this call's paid requests only."""

    judgments: int = 0
    cached: int = 0
    scored: int = 0
    unscored: int = 0
    missing: int = 0
    failed: int = 0
    calls: int = 0  # completions received (each paid)
    http_requests: int = 0  # every HTTP attempt, retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    max_in_flight: int = 0
    wall_s: float = 0.0

    def add(self, other: "JudgeStats") -> None:
        for name, value in asdict(other).items():
            mine = getattr(self, name)
            if name == "max_in_flight":
                setattr(self, name, max(mine, value))
            elif name == "cost_usd":
                setattr(self, name, None if mine is None or value is None else mine + value)
            else:
                setattr(self, name, mine + value)


@dataclass
class _Task:
    index: int  # position in the output
    clip_id: str
    field: str
    reference: str
    prediction: str
    repeat: int
    key: str


class Judge:
    """Scores JudgeItems through an OpenAI-compatible endpoint, with the cache in front."""

    def __init__(self, config: JudgeConfig | None = None):
        self.config = config or JudgeConfig()
        self.prompts = JudgePrompts.load(self.config)
        self.prompt_sha = self.prompts.sha(self.config.judge_per_clip)
        self.price = price_for(self.config.judge_model, load_price_table(self.config.judge_price_table))
        self.cache = JudgeCache(self.config.judge_cache or default_cache())
        self.total = JudgeStats(cost_usd=0.0 if self.price else None)  # every judge() call of this object
        self.last: JudgeStats | None = None  # the latest judge() call

    def describe(self) -> dict[str, Any]:
        """What the report says about the judge (no key)."""
        return {"model": self.config.judge_model, "prompt_sha": self.prompt_sha, "per_clip": self.config.judge_per_clip,
                "base_url": self.config.judge_base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
                "price_per_million_tokens": dict(self.price) if self.price else None}

    def judge(self, items: Sequence[JudgeItem], desc: str = "judging") -> list[Judgment]:
        return asyncio.run(self.ajudge(items, desc))

    def usage_of(self, items: Sequence[JudgeItem]) -> dict[str, Any]:
        """Tokens and cost of every call behind the judgments of these items, earlier runs included."""
        keys = [t.key for t in self._tasks(items) if isinstance(t, _Task)]
        prompt, completion = self.cache.usage(keys)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost_usd(prompt, completion, self.price)}

    def close(self) -> None:
        self.cache.close()

    def check_ready(self, items: Sequence[JudgeItem]) -> None:
        """Raise the one-line error judging `items` would stop at (no API key, no openai) when some of them
        need a call; said before any other work. Judgments all in the cache need neither."""
        keys = {t.key for t in self._tasks(items) if isinstance(t, _Task)}
        if len(self.cache.get_many(list(keys))) < len(keys):
            self._connection()

    # ------------------------------------------------------------------ internals

    def _tasks(self, items: Sequence[JudgeItem]) -> list[_Task | Judgment]:
        out: list[_Task | Judgment] = []
        for item in items:
            for name in item.fields or schema.FIELD_NAMES:
                if name not in item.prediction:
                    out.append(Judgment(item.clip_id, name, item.repeat, MISSING_SCORE, "missing"))
                    continue
                ref, pred = render_value(item.reference[name]), render_value(item.prediction[name])
                key = JudgeCache.key(self.config.judge_model, self.prompt_sha, name, ref, pred, item.repeat)
                out.append(_Task(len(out), item.clip_id, name, ref, pred, item.repeat, key))
        return out

    def _connection(self):
        """(the openai module, the API key), or the one-line error saying which is missing."""
        from avlabel.extras import require

        openai = require("openai", "judge", "the LLM judge")
        api_key = self.config.judge_api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise JudgeError("no API key for the judge: set OPENAI_API_KEY or --judge_api_key "
                             "(any string for a local server that ignores it)")
        return openai, api_key

    def _client(self, stats: JudgeStats):
        openai, api_key = self._connection()

        async def count_request(request) -> None:
            stats.http_requests += 1

        return openai.AsyncOpenAI(
            base_url=self.config.judge_base_url,
            api_key=api_key,
            timeout=self.config.judge_timeout,
            max_retries=self.config.judge_max_retries,
            http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [count_request]}),
        )

    async def ajudge(self, items: Sequence[JudgeItem], desc: str = "judging") -> list[Judgment]:
        from tqdm import tqdm

        started = time.perf_counter()
        stats = JudgeStats(cost_usd=0.0 if self.price else None)
        slots: list[_Task | Judgment] = self._tasks(items)
        tasks = [t for t in slots if isinstance(t, _Task)]
        cached = self.cache.get_many(list({t.key for t in tasks}))
        results: list[Judgment | None] = [s if isinstance(s, Judgment) else None for s in slots]
        pending: dict[str, list[_Task]] = {}  # one call per key even when items repeat a comparison
        for task in tasks:
            row = cached.get(task.key)
            if row is not None:
                results[task.index] = Judgment(task.clip_id, task.field, task.repeat, row["score"], row["status"],
                                               row["reason"], cached=True)
            else:
                pending.setdefault(task.key, []).append(task)

        groups = self._group([same[0] for same in pending.values()])
        client = self._client(stats) if groups else None  # without a key, the one line comes before the bar
        bar = tqdm(total=sum(map(len, groups)), desc=desc, unit="judgment", disable=not self.config.judge_progress or not groups)
        semaphore = asyncio.Semaphore(self.config.judge_concurrency)
        in_flight = failed = 0

        async def complete(client, messages) -> tuple[str, int, int]:
            nonlocal in_flight
            async with semaphore:
                in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, in_flight)
                try:
                    extra = {} if self.config.judge_temperature is None else {"temperature": self.config.judge_temperature}
                    response = await client.chat.completions.create(model=self.config.judge_model, messages=messages, **extra)
                finally:
                    in_flight -= 1
            usage = response.usage
            stats.calls += 1
            return (response.choices[0].message.content or "", usage.prompt_tokens if usage else 0,
                    usage.completion_tokens if usage else 0)

        async def judge_group(client, group: list[_Task]) -> None:
            import openai

            nonlocal failed
            outcome: dict[str, Judgment] = {}
            open_tasks, call_id, prompt_tokens, completion_tokens, last_text = list(group), uuid.uuid4().hex, 0, 0, ""
            for _ in range(self.config.judge_parse_retries + 1):
                try:
                    text, p_tok, c_tok = await complete(client, self.prompts.messages(open_tasks, self.config.judge_per_clip))
                except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
                    raise JudgeError(f"the judge endpoint refused the request ({err.status_code}): {err.message}") from err
                except openai.OpenAIError as err:  # retries exhausted, or a request the endpoint rejects
                    for task in open_tasks:
                        outcome[task.key] = Judgment(task.clip_id, task.field, task.repeat, None, "failed", f"{type(err).__name__}: {err}")
                    open_tasks = []
                    break
                prompt_tokens, completion_tokens, last_text = prompt_tokens + p_tok, completion_tokens + c_tok, text
                if self.config.judge_per_clip:
                    parsed = parse_clip_answer(text, [t.field for t in open_tasks])
                else:
                    answer = parse_field_answer(text)
                    parsed = {open_tasks[0].field: answer} if answer else {}
                for task in open_tasks:
                    if task.field in parsed:
                        score, reason = parsed[task.field]
                        outcome[task.key] = Judgment(task.clip_id, task.field, task.repeat, score, "scored", reason)
                open_tasks = [t for t in open_tasks if t.field not in parsed]
                if not open_tasks:
                    break
            for task in open_tasks:  # answered, but never with a usable score
                outcome[task.key] = Judgment(task.clip_id, task.field, task.repeat, None, "unscored",
                                             f"no score in the answer after {self.config.judge_parse_retries + 1} tries: {last_text[-2000:]}")
            rows = []
            for task in group:
                judgment = outcome[task.key]
                for same in pending[task.key]:
                    results[same.index] = Judgment(same.clip_id, same.field, same.repeat, judgment.score,
                                                   judgment.status, judgment.reason)
                if judgment.status != "failed":  # a failure got no paid answer: the rerun asks again
                    rows.append({"key": task.key, "model": self.config.judge_model, "prompt_sha": self.prompt_sha,
                                 "field": task.field, "reference": task.reference, "prediction": task.prediction,
                                 "repeat": task.repeat, "score": judgment.score, "status": judgment.status,
                                 "reason": judgment.reason, "call_id": call_id, "prompt_tokens": prompt_tokens,
                                 "completion_tokens": completion_tokens, "created": time.time()})
            stats.prompt_tokens += prompt_tokens
            stats.completion_tokens += completion_tokens
            if rows:
                self.cache.put(rows)
            bar.update(len(group))
            failed += len(group) - len(rows)
            if failed >= self.config.judge_max_failures:
                # the error's own text last: it ends its sentence itself ("Connection error.")
                raise JudgeError(f"{failed} judgments got no answer from {self.describe()['base_url']} (judgments so far "
                                 f"are cached; rerun to continue); last error: {outcome[group[-1].key].reason}")

        try:
            if client is not None:
                async with client, asyncio.TaskGroup() as running:
                    for group in groups:
                        running.create_task(judge_group(client, group))
        except* JudgeError as errors:
            raise errors.exceptions[0] from None
        finally:
            bar.close()
            stats.wall_s = time.perf_counter() - started
            if stats.cost_usd is not None:
                stats.cost_usd = cost_usd(stats.prompt_tokens, stats.completion_tokens, self.price)
            self._count(stats, results)
            self.total.add(stats)
            self.last = stats
        return [r for r in results if r is not None]

    def _group(self, tasks: list[_Task]) -> list[list[_Task]]:
        """One call per field, or per (clip, repeat) with all its fields when judge_per_clip."""
        if not self.config.judge_per_clip:
            return [[t] for t in tasks]
        groups: dict[tuple[str, int], list[list[_Task]]] = {}
        for task in tasks:
            same_clip = groups.setdefault((task.clip_id, task.repeat), [])
            # a field appears once per call: a second comparison of it goes to another call
            group = next((g for g in same_clip if all(t.field != task.field for t in g)), None)
            if group is None:
                same_clip.append(group := [])
            group.append(task)
        return [group for same_clip in groups.values() for group in same_clip]

    @staticmethod
    def _count(stats: JudgeStats, results: Sequence[Judgment | None]) -> None:
        done = [r for r in results if r is not None]
        stats.judgments = len(done)
        stats.cached = sum(r.cached for r in done)
        for status in ("scored", "unscored", "missing", "failed"):
            setattr(stats, status, sum(r.status == status for r in done))


# --------------------------------------------------------------------------- runs


def run_items(run: Run) -> list[JudgeItem]:
    return [JudgeItem(clip, run.references[clip], run.predictions[clip].label) for clip in run.clip_ids]


def score_arrays(judgments: Sequence[Judgment], clip_ids: Sequence[str], repeat: int = 0) -> dict[str, np.ndarray]:
    """{field: per-clip scores} in clip order; NaN where the judge gave no score."""
    position = {clip: i for i, clip in enumerate(clip_ids)}
    arrays = {name: np.full(len(clip_ids), np.nan) for name in schema.FIELD_NAMES}
    for j in judgments:
        if j.repeat == repeat and j.clip_id in position and j.score is not None:
            arrays[j.field][position[j.clip_id]] = j.score
    return arrays


# --------------------------------------------------------------------------- command line


@dataclass
class JudgeArguments(RunArguments):
    output_dir: str = field(metadata={"help": "where judgments.jsonl and judge_summary.json are written"})
    trust: bool = field(default=False, metadata={"help": "also run the judge-trust checks (identity, shuffled, order swap, repeats, agreement)"})
    trust_clips: int = field(default=30, metadata={"help": "clips sampled for the trust checks"})
    trust_repeats: int = field(default=3, metadata={"help": "times each sampled item is judged for the repeat-variance check"})
    seed: int = field(default=0, metadata={"help": "seed of the trust sample"})


def make_parser(subparsers=None):
    from avlabel.core.parser import ArgumentParser

    types = [JudgeArguments, JudgeConfig]
    if subparsers is not None:
        return subparsers.add_parser("judge", dataclass_types=types)
    return ArgumentParser(dataclass_types=types, prog="avlabel judge")


def main(args: JudgeArguments, config: JudgeConfig) -> dict[str, Any]:
    from .metrics import evaluate_run
    from .trust import TrustConfig, judge_trust, trust_items  # trust imports this module

    run = read_run(args.predictions, args.references, args.split)
    judge = Judge(config)
    try:
        items = run_items(run)
        trust_config = TrustConfig(clips=args.trust_clips, repeats=args.trust_repeats, seed=args.seed) if args.trust else None
        judge.check_ready(items + (trust_items([run], trust_config)[0] if trust_config is not None else []))
        judgments = judge.judge(items, desc=f"judging {run.name}")
        trust = None
        if trust_config is not None:
            trust = judge_trust(judge, [run], {run.name: judgments}, {run.name: evaluate_run(run)}, trust_config)
        all_calls = judge.usage_of(items)
    except KeyboardInterrupt:
        print("\ninterrupted: every judgment received so far is in the cache "
              f"({judge.cache.path}); run the same command again to continue", file=sys.stderr)
        raise SystemExit(130)
    finally:
        judge.close()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "judgments.jsonl").open("w", encoding="utf-8") as handle:
        for j in judgments:
            handle.write(json.dumps(j.to_dict(), ensure_ascii=False) + "\n")
    scores = score_arrays(judgments, run.clip_ids)
    summary = {
        "run": run.name,
        "clips": len(run.clip_ids),
        "judge": judge.describe(),
        "fields": {name: {"mean": None if np.isnan(a).all() else float(np.nanmean(a)), "scored": int((~np.isnan(a)).sum())}
                   for name, a in scores.items()},
        "this_run": asdict(judge.total),
        "all_calls": all_calls,
        "missing_clips": run.missing,
        "problems": [str(p) for p in run.problems],
        "trust": trust,
    }
    (out / "judge_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    stats = judge.total
    cost = "unknown (no price for this model)" if stats.cost_usd is None else f"${stats.cost_usd:.4f}"
    print(f"{stats.judgments} judgments: {stats.cached} from cache, {stats.calls} calls ({stats.http_requests} HTTP requests), "
          f"{stats.unscored} unscored, {stats.missing} missing answers, {stats.failed} failed; "
          f"{stats.prompt_tokens}+{stats.completion_tokens} tokens, cost {cost}")
    for name, entry in summary["fields"].items():
        print(f"  {name:34s} {'n/a' if entry['mean'] is None else format(entry['mean'], '.2f'):>5}  ({entry['scored']} scored)")
    print(f"wrote {out / 'judgments.jsonl'} and {out / 'judge_summary.json'}")
    return summary


if __name__ == "__main__":
    from avlabel.cli import run_command

    run_command("judge")
