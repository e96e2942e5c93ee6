"""The OpenAI-compatible HTTP server: `create_app(path)` → a FastAPI app (run it with uvicorn).

Routes: POST /v1/completions and /v1/chat/completions (whole or streamed as server-sent events), GET /v1/models,
/health (503 while the model loads, 200 once it serves), /metrics (Prometheus). The model loads in a background
thread at startup so /health answers at once. Requests go to the batching scheduler (scheduler.py); bad requests
get a 400 in OpenAI's error shape (errors.py). With an API key, every /v1 route wants `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from scalelm.infer.generate import GenerationError, Generator
from scalelm.infer.generate import Request as Row
from scalelm.infer.sampling import Sampling
from scalelm.serve.errors import APIError, error_response
from scalelm.serve.metrics import CountRequests, ServerMetrics
from scalelm.serve.responses import Choice, chat_logprobs, completion_logprobs, sse, usage
from scalelm.serve.scheduler import Job, Scheduler
from scalelm.serve.schemas import ChatCompletionRequest, CompletionRequest
from scalelm.serve.template import TURN_STOPS, chat_prompt


class ServerState:
    """The model behind the routes: loaded by `load()` in a thread; `ready` is set once it serves."""

    def __init__(self, loader: Callable[[], tuple], model_name: str, max_batch: int, max_tokens: int | None,
                 api_key: str | None, cpu_matmul: str | None):
        self.loader, self.model_name, self.max_batch = loader, model_name, max_batch
        self.max_tokens_limit, self.api_key, self.cpu_matmul = max_tokens, api_key, cpu_matmul
        self.metrics = ServerMetrics()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.generator: Generator | None = None
        self.scheduler: Scheduler | None = None
        self.created = int(time.time())

    def load(self) -> None:
        try:
            model, tokenizer = self.loader()
            self.generator = Generator(model, tokenizer, cpu_matmul=self.cpu_matmul)
        except Exception as e:  # /health reports it; the process stays up to say so
            self.load_error = f"{e.__class__.__name__}: {e}"
            return
        context = self.generator.cfg.max_seq_len
        self.max_tokens_limit = min(self.max_tokens_limit or context, context)
        self.scheduler = Scheduler(self.generator, self.metrics, self.max_batch)
        self.ready.set()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()


def model_name_of(path: str | Path) -> str:
    """A run's name: its directory's (RUN/checkpoints/step_N → RUN)."""
    path = Path(path).resolve()
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def create_app(path: str | Path | None = None, *, max_batch: int = 8, max_tokens: int | None = None,
               api_key: str | None = None, model_name: str | None = None, device: str = "cpu",
               cpu_matmul: str | None = None, loader: Callable[[], tuple] | None = None) -> FastAPI:
    """The server of the run or checkpoint at `path` (or of what `loader()` returns: (model, tokenizer)).
    max_tokens: the most tokens one choice may ask for (default and cap: the model's context)."""
    if loader is None:
        from scalelm.infer.load import load_for_inference

        def loader():
            return load_for_inference(path, device)

    state = ServerState(loader, model_name or model_name_of(path or "model"), max_batch, max_tokens, api_key,
                        cpu_matmul)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="scalelm-load", daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="scalelm", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error')})")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        return error_response(400, message, loc[0] if loc else None)

    app.add_middleware(CountRequests, metrics=state.metrics)

    def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided; send it as `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    def serving(body_model: str | None = None) -> Generator:
        if not state.ready.is_set():
            raise APIError(503, "the model is still loading; retry when /health answers 200" if not state.load_error
                           else f"the model failed to load: {state.load_error}")
        if body_model is not None and body_model != state.model_name:
            raise APIError(404, f"The model `{body_model}` does not exist; this server serves "
                           f"`{state.model_name}`", "model", "model_not_found")
        return state.generator

    @app.get("/health")
    async def health():
        if state.ready.is_set():
            return {"status": "ok"}
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        serving()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "scalelm"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        generator = serving(body.model)
        prompts = body.prompts()
        rows, prompt_tokens = _rows(state, generator, prompts, body, body.max_tokens, body.stops(),
                                    logprobs=body.logprobs is not None, top=body.logprobs or 0, param="prompt")
        offsets = [len(p) for p in prompts for _ in range(body.n)]
        return await _respond(state, request, rows, prompt_tokens, body, "text_completion", "cmpl", "/v1/completions",
                              lambda choice: _completion_choice(generator, choice, body, offsets[choice.index]),
                              lambda delta: _completion_piece(generator, delta, body, offsets[delta.index]))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        generator = serving(body.model)
        prompt = chat_prompt([(m.role, m.text()) for m in body.messages])
        rows, prompt_tokens = _rows(state, generator, [prompt], body, body.token_budget(), body.stops() + TURN_STOPS,
                                    logprobs=body.logprobs, top=body.top_logprobs or 0, param="messages")
        return await _respond(state, request, rows, prompt_tokens, body, "chat.completion", "chatcmpl",
                              "/v1/chat/completions", lambda choice: _chat_choice(generator, choice, body),
                              lambda delta: _chat_piece(generator, delta, body))

    return app


def _rows(state: ServerState, generator: Generator, prompts: list[str], body, budget: int | None,
          stops: tuple[str, ...], logprobs: bool, top: int, param: str) -> tuple[list[Row], int]:
    """The engine rows of a request (n per prompt, choice index = prompt · n + j) and its prompt tokens; a 400 for
    a prompt that cannot be served or a budget over the limits. Choice i of a seeded request draws with seed + i."""
    context, limit = generator.cfg.max_seq_len, state.max_tokens_limit
    if len(prompts) * body.n > state.max_batch:
        raise APIError(400, f"this request asks for {len(prompts) * body.n} choices (prompts × n) but the server "
                       f"batches at most {state.max_batch}; lower n or start it with a larger --max-batch", "n")
    if budget is not None and budget > limit:
        raise APIError(400, f"max_tokens={budget} is over this server's limit of {limit} tokens per choice; ask "
                       f"for at most {limit}", "max_tokens")
    sampling = Sampling(temperature=body.temperature, top_p=body.top_p)
    rows, prompt_tokens = [], 0
    for prompt in prompts:
        try:
            n_tokens = len(generator.encode(prompt))
        except GenerationError as e:
            raise APIError(400, str(e), param) from None
        prompt_tokens += n_tokens
        room = context - n_tokens
        if budget is not None and budget > room:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                           f"{n_tokens}, so max_tokens can be at most {room} (got {budget})", "max_tokens")
        for _ in range(body.n):
            seed = None if body.seed is None else (body.seed + len(rows)) % 2**63
            rows.append(Row(prompt, min(room, limit) if budget is None else budget, sampling, seed, stops,
                            logprobs, top))
    return rows, prompt_tokens


async def _respond(state: ServerState, request: Request, rows: list[Row], prompt_tokens: int, body, kind: str,
                   prefix: str, route: str, whole: Callable[[Choice], dict], piece: Callable) -> Response:
    """Submit the rows and answer: one JSON body, or a stream of chunks ending in `data: [DONE]`."""
    job = Job(rows, asyncio.get_running_loop())
    state.scheduler.submit(job)
    header = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
              "model": state.model_name}
    metrics = state.metrics
    metrics.prompt_tokens.inc(prompt_tokens)

    def finished(completion_tokens: int) -> None:
        metrics.completion_tokens.inc(completion_tokens)
        metrics.latency.labels(route).observe(time.perf_counter() - job.submitted_s)
        if job.first_token_s is not None:
            metrics.first_token.observe(job.first_token_s)

    if not body.stream:
        choices = [Choice(i) for i in range(len(rows))]
        try:
            async for delta in job.deltas(request.is_disconnected):
                choices[delta.index].add(delta)
        except BaseException:
            job.cancel()
            raise
        if job.cancelled:  # the client went away: nobody reads an answer
            metrics.cancelled.inc()
            return Response(status_code=499)
        completion_tokens = sum(len(c.tokens) for c in choices)
        finished(completion_tokens)
        return JSONResponse({**header, "choices": [whole(c) for c in choices],
                             "usage": usage(prompt_tokens, completion_tokens)})

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    chunk_kind = kind + ".chunk" if kind == "chat.completion" else kind

    async def events():
        completion_tokens, done = 0, False
        try:
            if kind == "chat.completion":  # the role comes first, once per choice
                for i in range(len(rows)):
                    yield sse(_chunk(header, chunk_kind, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}], include_usage))
            async for delta in job.deltas():
                completion_tokens += len(delta.tokens)
                if delta.text or delta.finish_reason or (delta.tokens and delta.logprobs):
                    yield sse(_chunk(header, chunk_kind, [piece(delta)], include_usage))
            done = True
            finished(completion_tokens)
            if include_usage:
                yield sse({**header, "object": chunk_kind, "choices": [],
                           "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        finally:
            if not done:  # the client went away (or the engine failed): free its rows
                job.cancel()
                metrics.cancelled.inc()

    return StreamingResponse(events(), media_type="text/event-stream")


def _chunk(header: dict, kind: str, choices: list[dict], include_usage: bool) -> dict:
    chunk = {**header, "object": kind, "choices": choices}
    if include_usage:
        chunk["usage"] = None
    return chunk


def _completion_choice(generator: Generator, c: Choice, body: CompletionRequest, offset: int) -> dict:
    lps = completion_logprobs(generator.tokenizer, c, offset, bool(body.logprobs)) if body.logprobs is not None \
        else None
    return {"index": c.index, "text": c.text, "logprobs": lps, "finish_reason": c.finish_reason}


def _completion_piece(generator: Generator, delta, body: CompletionRequest, offset: int) -> dict:
    lps = completion_logprobs(generator.tokenizer, delta, offset, bool(body.logprobs)) \
        if body.logprobs is not None else None
    return {"index": delta.index, "text": delta.text, "logprobs": lps, "finish_reason": delta.finish_reason}


def _chat_choice(generator: Generator, c: Choice, body: ChatCompletionRequest) -> dict:
    lps = chat_logprobs(generator.tokenizer, c.tokens, c.logprobs, c.top, bool(body.top_logprobs)) \
        if body.logprobs else None
    return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lps,
            "finish_reason": c.finish_reason}


def _chat_piece(generator: Generator, delta, body: ChatCompletionRequest) -> dict:
    lps = chat_logprobs(generator.tokenizer, delta.tokens, delta.logprobs or [], delta.top_logprobs or [],
                        bool(body.top_logprobs)) if body.logprobs else None
    return {"index": delta.index, "delta": {"content": delta.text} if delta.text else {}, "logprobs": lps,
            "finish_reason": delta.finish_reason}
