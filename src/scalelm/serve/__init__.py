"""The OpenAI-compatible server: `scalelm serve RUN` (cli.py), the FastAPI app (app.py: `create_app`), dynamic
batching onto the generation engine (scheduler.py), request schemas, OpenAI response and error shapes, Prometheus
metrics and the plain chat template. Importing the package imports none of them, so `scalelm serve` checks its
flags before loading torch and the web stack."""
