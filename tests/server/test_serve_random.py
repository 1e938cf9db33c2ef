"""benchmarks/serve_random.py, the server the GPU serving benchmark runs: `cmd_serve` with its own
engine builder (a random-weight model of a real shape), and a tokenizer padded with dummy tokens to
the model's vocabulary (128,256 ids) so that every sampled id streams out as text."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from tests.server.test_serve_cli import read_until

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "serve_random.py")


def test_random_model_serves_every_token_as_text(smollm2_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--shape", "tiny-128k", "--host", "127.0.0.1", "--port", "0",
                             "--device", "cpu", "--kv-cache-memory-gb", "0.1", "--shutdown-timeout", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    try:
        assert "(49152 ids) + 79104 added dummy tokens" in read_until(proc, r"tokenizer: .*", lines).group(0)
        url = read_until(proc, r"listening on (http://127\.0\.0\.1:\d+)", lines).group(1)
        read_until(proc, r"serving 'random:tiny-128k' \(random:tiny-128k\) on cpu \(float32\)", lines)
        body = {"model": "random:tiny-128k", "prompt": "The capital of France is", "max_tokens": 12,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
        # a random model samples dummies most of the time (62% of the vocabulary): they are text too.
        # (Tokens that arrive while the client is still reading go out as one chunk: up to 12 chunks.)
        assert 1 <= len(texts) <= 12 and all(texts) and "<|dummy_" in "".join(texts), texts
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines + proc.stderr.readlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
