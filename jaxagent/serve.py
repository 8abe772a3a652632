"""Serve a model over an OpenAI-compatible HTTP API: `/v1/chat/completions` and `/v1/models`.

    python -m jaxagent.serve --model HF_OR_POLICY_DIR [--port 8000] [--host 127.0.0.1] [--max-len 4096]
    python -m jaxagent.serve --run RUN_DIR [--stage NAME] ...

`--run` serves the run's last finished stage (or `--stage`). Concurrent requests are decoded together in batches
(`jaxagent.serving`); replies use the tokenizer's chat template. Supported request fields: `messages`,
`temperature`, `top_p`, `max_tokens`, `stop`, and `n` = 1 (no streaming). `--port 0` picks a free port; the first
line printed names the address. `GET /health` reports requests served and the largest batch so far.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

from jaxagent import compiling
from jaxagent.errors import UserError, run_main
from jaxagent.serving import ChatModel, ServingError


class BadRequest(ValueError):
    """A request body the API does not accept; the message says what would be valid."""


def parse_request(body: dict) -> dict:
    """The `ChatModel.complete` arguments of a chat-completions request body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRequest("'messages' must be a non-empty list of {\"role\": ..., \"content\": \"...\"} objects")
    if body.get("n", 1) != 1 or body.get("stream"):
        raise BadRequest("only n=1 without streaming is served")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of non-empty strings")
    try:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                "temperature": float(body.get("temperature", 1.0)), "top_p": float(body.get("top_p", 1.0)),
                "max_tokens": int(body.get("max_tokens") or 256), "stop": stop}
    except (TypeError, ValueError):
        raise BadRequest("'temperature' and 'top_p' must be numbers, 'max_tokens' an integer") from None


def make_handler(model: ChatModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.rstrip("/") == "/v1/models":
                self._reply(200, {"object": "list", "data": [{"id": model.name, "object": "model",
                                                              "owned_by": "jaxagent"}]})
            elif self.path.rstrip("/") == "/health":
                self._reply(200, {"requests": model.requests_served, "largest_batch": model.largest_batch})
            else:
                self._error(404, f"no route {self.path}; try /v1/chat/completions or /v1/models")

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}; try /v1/chat/completions")
                return
            try:
                length = int(self.headers.get("Content-Length", 0))
                request = parse_request(json.loads(self.rfile.read(length) or b"{}"))
                completion = model.complete(**request)
            except (BadRequest, ServingError, json.JSONDecodeError) as err:
                self._error(400, str(err))
                return
            self._reply(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                             "finish_reason": completion.finish_reason}],
                "usage": {"prompt_tokens": completion.prompt_tokens,
                          "completion_tokens": completion.completion_tokens,
                          "total_tokens": completion.prompt_tokens + completion.completion_tokens}})

        def log_message(self, *args) -> None:  # one line per request would flood the log
            pass

        def _error(self, status: int, message: str) -> None:
            self._reply(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def run_stage_policy(run_dir: Path, stage: str | None) -> Path:
    """The policy folder of the run's last finished stage (or `stage`)."""
    from jaxagent.checkpoint import is_policy_folder

    stages_dir = run_dir / "stages"
    finished = sorted((p for p in stages_dir.glob("*") if is_policy_folder(p / "policy")),
                      key=lambda p: p.stat().st_mtime) if stages_dir.is_dir() else []
    if stage is not None:
        if not is_policy_folder(stages_dir / stage / "policy"):
            raise UserError(f"--stage {stage!r} has no finished policy in {run_dir}; finished: "
                            f"{', '.join(p.name for p in finished) or 'none'}")
        return stages_dir / stage / "policy"
    if not finished:
        raise UserError(f"{run_dir}: no finished stage to serve (give the folder `python -m jaxagent.train` wrote)")
    return finished[-1] / "policy"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxagent.serve", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face folder or jaxagent policy folder")
    source.add_argument("--run", help="a training run's folder: serves its last finished stage")
    parser.add_argument("--stage", default=None, help="with --run: the stage to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-len", type=int, default=4096, help="tokens per conversation (prompt and reply)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    args = parser.parse_args(argv)
    compiling.prepare()  # before the first JAX computation
    folder = Path(args.model) if args.model else run_stage_policy(Path(args.run), args.stage)
    model = ChatModel(folder, max_len=args.max_len, max_batch=args.max_batch)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(model))
    host, port = server.server_address[:2]
    print(f"serving {model.name} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
