"""benchmarks/gpu_serve.py's HTTP clients: spread over spawned processes, they start together once every
process has connected and finished its warm-up request, and the span is timed from that start. A
process that starts late (slow imports, a slow warm-up) must not count in the span: that once halved
the measured HTTP throughput on an H200."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from benchmarks.gpu_serve import run_clients

WARM_UP_TOKENS = 4  # what gpu_serve's warm-up request asks for
SLOW_WARM_UP_S = 8.0  # past the fixed 5 s start window the clients once had


class StreamingCompletions(BaseHTTPRequestHandler):
    """POST /v1/completions with stream=True: one SSE chunk per token, a usage chunk, [DONE]; warm-up
    requests answer after SLOW_WARM_UP_S."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        tokens = body["max_tokens"]
        if tokens == WARM_UP_TOKENS:
            time.sleep(SLOW_WARM_UP_S)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for _ in range(tokens):
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
        self.wfile.write(b'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % tokens)
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args) -> None:
        pass


def test_clients_start_together_after_slow_warm_ups():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StreamingCompletions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reqs = [{"prompt_token_ids": [1, 2, 3], "max_tokens": 8} for _ in range(8)]
        result = run_clients(f"http://127.0.0.1:{server.server_address[1]}/v1", reqs, clients=4, procs=2)
    finally:
        server.shutdown()
    assert result["num_failures"] == 0, result["failures"]
    assert result["output_tokens"] == 8 * 8
    assert result["chunks_per_request"]["max"] == 8
    # the span covers the 8 requests only, not the 8 s warm-ups before the common start
    assert result["client_start_late_s"] < 1.5, result
    assert result["span_s"] < 2.0, result
