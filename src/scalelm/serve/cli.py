"""`scalelm serve RUN_OR_CKPT`: the OpenAI-compatible server on uvicorn, loopback unless told otherwise."""

from __future__ import annotations

import os
import socket
import sys

from scalelm.usage import CliParser, UsageError

API_KEY_ENV = "SCALELM_API_KEY"


def _parser() -> CliParser:
    p = CliParser(prog="scalelm serve", description="Serve a run over OpenAI's HTTP API (/v1/completions, "
                  "/v1/chat/completions, /v1/models, /health, /metrics) with batched generation.")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="most choices decoded together (default 32)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens one choice may ask for (default: the model's context)")
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` on /v1 routes "
                   f"(default: the {API_KEY_ENV} environment variable; unset = no key)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run's name)")
    p.add_argument("--device", default="cpu")
    return p


def _check_address(host: str, port: int) -> None:
    """Fail with one line if the address cannot be listened on (in use, or not this machine's), before loading."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(infos[0][4])
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") \
            from None


def main_serve(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} must be in 0-65535")
    if args.max_batch < 1:
        raise UsageError(f"--max-batch {args.max_batch} must be >= 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError(f"--max-tokens {args.max_tokens} must be >= 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    _check_address(args.host, args.port)
    import uvicorn

    from scalelm.infer.load import tokenizer_dir
    from scalelm.serve.app import create_app
    from scalelm.train.checkpoint import resolve_checkpoint

    tokenizer_dir(resolve_checkpoint(args.path))  # a wrong path fails here, before the server starts
    cpu_matmul = None
    if args.device.startswith("cpu"):
        from scalelm.train.peak import fastest_cpu_matmul

        cpu_matmul = fastest_cpu_matmul("fp32")
    app = create_app(args.path, max_batch=args.max_batch, max_tokens=args.max_tokens, api_key=api_key,
                     model_name=args.model_name, device=args.device, cpu_matmul=cpu_matmul)
    print(f"serving {args.path} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}"
          f"{', API key required' if api_key else ''}); /health answers 200 once the model has loaded",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
