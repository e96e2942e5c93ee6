"""The OpenAI-compatible server: `scalelm serve RUN` (cli.py), the FastAPI app (app.py), dynamic batching onto the
generation engine (scheduler.py), request schemas, OpenAI response and error shapes, Prometheus metrics and the
plain chat template."""

from scalelm.serve.app import create_app

__all__ = ["create_app"]
