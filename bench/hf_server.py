"""The baseline a Python user writes first: transformers `generate` behind a small HTTP server.

One request at a time (a lock around generate), streaming OpenAI-style
/v1/completions server-sent events through a streamer. Same GGUF weights as
attnserve, dequantised to dense float32 (or --dtype).

    python bench/hf_server.py --port 8091
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from attnserve.model.fetch import default_model_path


class QueueStreamer(BaseStreamer):
    """Hands each new token id to the HTTP handler as generate produces it."""

    def __init__(self) -> None:
        self.tokens: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt
            self._prompt_seen = True
            return
        for t in value.flatten().tolist():
            self.tokens.put(int(t))

    def end(self) -> None:
        self.tokens.put(None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8091)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    path = Path(a.model)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=getattr(torch, a.dtype),
        quantization_config=transformers.GgufConfig(dequantize=True),
    ).eval()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # health
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = torch.tensor([tok.encode(req["prompt"])])
            max_tokens = int(req.get("max_tokens", 16))
            streamer = QueueStreamer()
            kwargs = dict(max_new_tokens=max_tokens, do_sample=False, streamer=streamer, pad_token_id=tok.eos_token_id)
            if req.get("ignore_eos"):
                kwargs["min_new_tokens"] = max_tokens
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with lock:  # one request at a time: what plain `generate` gives you
                worker = threading.Thread(target=lambda: model.generate(ids, **kwargs))
                worker.start()
                while (token := streamer.tokens.get()) is not None:
                    self._event({"choices": [{"text": tok.decode([token]), "finish_reason": None}]})
                worker.join()
            self._event({"choices": [{"text": "", "finish_reason": "length"}]})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _event(self, obj: dict) -> None:
            self._chunk(f"data: {json.dumps(obj)}\n\n".encode())

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    server = ThreadingHTTPServer((a.host, a.port), Handler)
    print(f"transformers baseline on http://{a.host}:{a.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
