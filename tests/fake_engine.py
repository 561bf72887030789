"""A fake vLLM OpenAI-compatible server (stdlib http.server) for the teacher-server tests.

    with FakeEngine(vocab=64, max_logprobs=20) as eng:     # in a thread, 127.0.0.1, a free port
        eng.url; eng.fail_next = [503, 503]; eng.malformed = "missing"
    python tests/fake_engine.py --port 8123 [--child] [--ignore-term]     # as a process (launcher tests)

Its "model" is a bigram table: the distribution after token t is log_softmax(W[t]) with W seeded by `seed`,
so a test computes the exact reference with `reference_logprobs(ids)`; or, with `logprobs_fn` (ids -> (n-1, V)
log-probs, e.g. a real tiny teacher's forward), that model: FakeEngine(vocab=V, logprobs_fn=fn). Answers the endpoints kdflow uses,
in vLLM's shapes: /health, /version, /v1/models, /tokenize (one id per UTF-8 byte, mod vocab, + `shift`),
/v1/completions with `prompt_logprobs` (top-k + the prompt's own token, first entry null; a k above
`max_logprobs` and an id outside the vocabulary refused with 400 as vLLM words them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def bigram_table(vocab: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).normal(0, 2.0, (vocab, vocab))
    return w - np.log(np.exp(w - w.max(1, keepdims=True)).sum(1, keepdims=True)) - w.max(1, keepdims=True)


class FakeEngine:
    def __init__(self, *, vocab: int = 64, max_logprobs: int = 20, seed: int = 0, name: str = "kdflow-teacher",
                 shift: int = 0, port: int = 0, logprobs_fn=None):
        self.vocab, self.max_logprobs, self.name, self.shift = vocab, max_logprobs, name, shift
        self.logprobs_fn = logprobs_fn  # ids -> (n-1, vocab) log-probs; None: the bigram table
        self.table = bigram_table(vocab, seed)  # (V, V) log-probs, float64
        self.fail_next: list[int] = []  # HTTP statuses to answer the next completions requests with
        self.malformed: str | None = None  # "missing" | "short" | "not-json" | "bad-logprob"
        self.requests = 0
        self.completion_prompts = 0
        self.in_flight = self.max_in_flight = 0
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FakeEngine":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def tokenize(self, text: str) -> list[int]:
        return [(b + self.shift) % self.vocab for b in text.encode()]

    def reference_logprobs(self, ids: list[int]) -> np.ndarray:
        """(n-1, V): the distribution at each position but the last (what predicts ids[1:])."""
        if self.logprobs_fn is not None:
            return np.asarray(self.logprobs_fn(list(ids)), dtype=np.float64)
        return self.table[np.asarray(ids[:-1])]

    def _completion(self, body: dict) -> tuple[int, object]:
        prompts = body.get("prompt")
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        k = body.get("prompt_logprobs")
        if k is not None and (k > self.max_logprobs if self.max_logprobs != -1 else False):
            return 400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                   f"{self.max_logprobs}", "type": "BadRequestError", "code": 400}}
        for p in prompts:
            bad = [t for t in p if not 0 <= t < self.vocab]
            if bad:
                return 400, {"error": {"message": f"Token id {bad[0]} is out of vocabulary", "code": 400}}
        kk = self.vocab if k == -1 else k
        choices = []
        for i, p in enumerate(prompts):
            plp: list = [None]
            rows = self.reference_logprobs(p) if len(p) > 1 else None
            for j in range(1, len(p)):
                row = rows[j - 1]
                top = np.argsort(-row, kind="stable")[:kk]
                entry = {str(int(t)): {"logprob": float(row[t]), "rank": r + 1, "decoded_token": f"<{t}>"}
                         for r, t in enumerate(top)}
                if str(p[j]) not in entry:
                    entry[str(p[j])] = {"logprob": float(row[p[j]]),
                                        "rank": int((row > row[p[j]]).sum()) + 1, "decoded_token": f"<{p[j]}>"}
                plp.append(entry)
            choices.append({"index": i, "text": "x", "logprobs": None, "finish_reason": "length",
                            "prompt_logprobs": plp if k is not None else None})
        if self.malformed == "missing":
            for c in choices:
                del c["prompt_logprobs"]
        elif self.malformed == "short":
            choices[0]["prompt_logprobs"] = choices[0]["prompt_logprobs"][:-1]
        elif self.malformed == "bad-logprob" and len(choices[0]["prompt_logprobs"]) > 1:
            first = next(iter(choices[0]["prompt_logprobs"][1]))
            choices[0]["prompt_logprobs"][1][first]["logprob"] = "oops"
        return 200, {"id": "cmpl-fake", "object": "text_completion", "model": self.name, "choices": choices}

    def _handler(self):
        eng = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, obj, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                with eng._lock:
                    eng.requests += 1
                if self.path == "/health":
                    return self._send(200, {})
                if self.path == "/version":
                    return self._send(200, {"version": "0.32.0-fake"})
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [
                        {"id": eng.name, "object": "model", "root": "/fake/teacher", "max_model_len": 256}]})
                return self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with eng._lock:
                    eng.requests += 1
                    if self.path == "/v1/completions" and eng.fail_next:
                        status = eng.fail_next.pop(0)
                        return self._send(status, {"error": {"message": "injected"}})
                if self.path == "/tokenize":
                    return self._send(200, {"tokens": eng.tokenize(body.get("prompt", "")), "count": 0,
                                            "max_model_len": 256})
                if self.path != "/v1/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                with eng._lock:
                    eng.in_flight += 1
                    eng.max_in_flight = max(eng.max_in_flight, eng.in_flight)
                    eng.completion_prompts += len(body.get("prompt") or [])
                try:
                    time.sleep(eng.delay_s)
                    status, obj = (200, None) if eng.malformed == "not-json" else eng._completion(body)
                finally:  # before the reply goes out: the client may send its next request as soon as it has it
                    with eng._lock:
                        eng.in_flight -= 1
                if eng.malformed == "not-json":
                    return self._send(200, None, raw=b"<html>gateway</html>")
                return self._send(status, obj)

        return Handler


def main(argv: list[str]) -> None:
    """As a process: serve until SIGTERM; --child also starts a sleeping child in the same group (as vLLM's
    engine core), --ignore-term ignores SIGTERM (the launcher must escalate to SIGKILL), --die exits at once."""
    port = int(argv[argv.index("--port") + 1])
    if "--die" in argv:
        print("fake engine: cannot load the model", flush=True)
        sys.exit(3)
    if "--ignore-term" in argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--child" in argv:
        subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                          + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if "--ignore-term" in argv else "")
                          + "time.sleep(3600)"])
    if "--slow-start" in argv:
        time.sleep(float(argv[argv.index("--slow-start") + 1]))
    eng = FakeEngine(port=port)
    print(f"fake engine pid {os.getpid()} on {eng.url}", flush=True)
    eng.httpd.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
