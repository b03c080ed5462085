"""A small OpenAI-compatible chat-completions server for the judge's tests and benchmark.

It answers `POST /v1/chat/completions` the way OpenAI, vLLM or Ollama do, so the judge runs
through the real `openai` client. What it answers is scriptable:

* `script`: a queue of `Reply`/`Fail` actions, one consumed per request, before anything else
  (a 429 with Retry-After, a 500, a reply slower than the client's timeout, a text without
  `<answer>` tags...);
* `api_keys`, `models`: the keys and models it knows; others are refused (401 `invalid_api_key`,
  404 `model_not_found`). A request without a Bearer key is refused whatever these are;
* `responder(request_json) -> Reply | Fail`: what to answer once the script is empty; the default
  scores by how similar the two quoted answers in the judge's prompt are (identical = 5), per
  field or for every `### field` section of a per-clip prompt;
* `latency`: seconds every reply waits, served with asyncio so hundreds of requests can wait at
  once on two cores.

It records every request (`requests`: its body, the client's retry count header, the status answered
and the Retry-After sent), the most requests in flight at once (`max_in_flight`) and the usage tokens
it reported (word counts), and serves those numbers at `GET /stats`. Run
`python tests/openai_server.py --latency 1` for a standalone server (the benchmark does); it prints
`listening on http://127.0.0.1:PORT/v1`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Callable

from aiohttp import web

QUOTED = re.compile(r'"""\n(.*?)\n"""', re.DOTALL)
SECTION = re.compile(r"^### (\w+)$", re.MULTILINE)


@dataclass
class Reply:
    text: str
    delay: float = 0.0  # extra seconds before answering (beyond the server's latency)


@dataclass
class Fail:
    status: int
    retry_after: float | None = None
    message: str = "scripted failure"

    @property
    def kind(self) -> tuple[str, str]:
        """OpenAI's error `type` and `code` strings for this status."""
        return ("requests", "rate_limit_exceeded") if self.status == 429 else ("server_error", "server_error")


Responder = Callable[[dict], "Reply | Fail"]


def similarity_score(reference: str, prediction: str) -> int:
    return 1 + round(4 * SequenceMatcher(None, reference, prediction).ratio())


def similarity_responder(request: dict) -> Reply:
    """Score the quoted answer pairs of the prompt by string similarity, in the judge's answer format."""
    prompt = request["messages"][-1]["content"]
    sections = SECTION.split(prompt)
    if len(sections) > 1:  # per-clip prompt: "### field" headings, each followed by one answer pair
        lines = []
        for name, body in zip(sections[1::2], sections[2::2]):
            reference, prediction = QUOTED.findall(body)[:2]
            lines.append(f"{name}: compared.\n<answer field=\"{name}\">{similarity_score(reference, prediction)}</answer>")
        return Reply("\n".join(lines))
    reference, prediction = QUOTED.findall(prompt)[:2]
    score = similarity_score(reference, prediction)
    return Reply(f"The answers are {'identical' if score == 5 else 'different'} in places.\n<answer>{score}</answer>")


def words(text: str) -> int:
    return len(text.split())


def error_response(status: int, message: str, type_: str, code: str, headers: dict | None = None) -> web.Response:
    """An error in OpenAI's body shape, which the `openai` client reads into its exceptions."""
    return web.json_response({"error": {"message": message, "type": type_, "param": None, "code": code}},
                             status=status, headers=headers)


class OpenAIServer:
    def __init__(self, responder: Responder | None = None, latency: float = 0.0, host: str = "127.0.0.1", port: int = 0,
                 api_keys: set[str] | None = None, models: set[str] | None = None):
        self.responder = responder or similarity_responder
        # a request without a Bearer key is always refused; with these given, so are other keys and models
        self.api_keys, self.models = api_keys, models
        self.latency = latency
        self.host, self.port = host, port
        self.script: deque[Reply | Fail] = deque()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stats(self) -> dict:
        return {"requests": len(self.requests), "max_in_flight": self.max_in_flight,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def reset(self) -> None:
        self.requests.clear()
        self.max_in_flight = self.prompt_tokens = self.completion_tokens = 0

    def _refusal(self, request: web.Request, body: dict) -> web.Response | None:
        """401 for a missing or unknown key, 404 for an unknown model, as OpenAI answers them."""
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not key.strip():
            return error_response(401, "No API key was given: send it as 'Authorization: Bearer KEY'.",
                                  "invalid_request_error", "invalid_api_key")
        if self.api_keys is not None and key not in self.api_keys:
            return error_response(401, f"Incorrect API key provided: {key[:3]}...{key[-2:]}.",
                                  "invalid_request_error", "invalid_api_key")
        if self.models is not None and body.get("model") not in self.models:
            return error_response(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                                  "invalid_request_error", "model_not_found")
        return None

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        # status: what was answered (None: the client gave up first); retry_after: the Retry-After header sent
        record = {"body": body, "retry_count": int(request.headers.get("x-stainless-retry-count", 0)),
                  "status": None, "retry_after": None}
        self.requests.append(record)
        refusal = self._refusal(request, body)
        if refusal is not None:
            record["status"] = refusal.status
            return refusal
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            action = self.script.popleft() if self.script else self.responder(body)
            await asyncio.sleep(self.latency + (action.delay if isinstance(action, Reply) else 0.0))
            if isinstance(action, Fail):
                headers = {} if action.retry_after is None else {"Retry-After": f"{action.retry_after:g}"}
                record["status"], record["retry_after"] = action.status, action.retry_after
                return error_response(action.status, action.message, *action.kind, headers=headers)
            record["status"] = 200
            prompt_tokens = sum(words(m["content"]) for m in body["messages"])
            completion_tokens = words(action.text)
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            return web.json_response({
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": action.text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })
        finally:
            self.in_flight -= 1

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/stats", self._stats)
        # handler_cancellation: a client that timed out cancels its (sleeping) handler, so stop() is quick
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> "OpenAIServer":
        """Serve from a background thread (tests)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _serve(server: OpenAIServer) -> None:
    await server._start()
    print(f"listening on {server.base_url}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds every reply waits")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    asyncio.run(_serve(OpenAIServer(latency=options.latency, port=options.port)))
