"""A tiny run saved at random weights, and a uvicorn server in a thread on a free loopback port, for the tests that
drive the server with the official openai client."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import uvicorn

from scalelm.data.tokenizer import CharTokenizer
from scalelm.model import get_preset
from scalelm.model.gpt import GPT
from scalelm.train.checkpoint import save_checkpoint

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :,.!?\n"


def tiny_run(run_dir: Path, max_seq_len: int = 1024, **changes) -> Path:
    """A run directory with a random two-layer model (a long context, so one stream can outlast a disconnect)."""
    torch.manual_seed(0)
    model = GPT(replace(get_preset("tiny"), **({"n_layer": 2, "vocab_size": 64, "max_seq_len": max_seq_len} | changes)))
    save_checkpoint(run_dir, 0, model, [], {}, keep=1)
    CharTokenizer.from_text(ALPHABET).save(run_dir / "tokenizer")
    return run_dir


@contextmanager
def serving(app):
    """Run `app` on 127.0.0.1 at a port the OS picks; yields the base URL; stops the server at exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server stopped before it started")
            threading.Event().wait(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
