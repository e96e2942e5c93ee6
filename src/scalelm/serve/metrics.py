"""The server's Prometheus metrics, in a registry of its own (two servers in one process do not share counts)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServerMetrics:
    """Requests by route and status, prompt and completion tokens (and all the engine decoded), request latency,
    time to first token, the rows of each engine batch, the rows waiting for one, and requests whose client left
    before the end."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("scalelm_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("scalelm_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.completion_tokens = Counter("scalelm_completion_tokens", "tokens of completed requests", registry=r)
        self.engine_tokens = Counter("scalelm_engine_tokens", "tokens the engine decoded, for requests later "
                                     "cancelled too", registry=r)
        self.latency = Histogram("scalelm_request_latency_seconds", "time from request to its last token",
                                 ["route"], registry=r)
        self.first_token = Histogram("scalelm_time_to_first_token_seconds", "time from request to its first token",
                                     registry=r)
        self.batch_size = Histogram("scalelm_batch_size", "rows (choices) in each engine batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.waiting = Gauge("scalelm_waiting_rows", "rows queued for the next batch", registry=r)
        self.cancelled = Counter("scalelm_cancelled_requests", "requests whose client disconnected before the end",
                                 registry=r)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountRequests:
    """ASGI middleware counting each HTTP response by path and status. Plain ASGI rather than Starlette's
    BaseHTTPMiddleware, which wraps `receive` and hides a client's disconnect from the route."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
