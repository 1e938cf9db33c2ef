"""`bitfold serve` as a user runs it: the status lines (where it listens, which model, KV
capacity), a graceful SIGTERM (a short request finishes, a long one is ended cleanly with an
error event and [DONE], exit status 0), and bad input as one `bitfold: error:` line with status 2:
a model that does not load, a port that is taken, the serve extras missing."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from bitfold.cli import main


def spawn(*args: str) -> subprocess.Popen:
    # One torch thread: on a busy 2-core machine two threads spin against each other.
    return subprocess.Popen([sys.executable, "-m", "bitfold.cli", "serve", "--host", "127.0.0.1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def read_until(proc: subprocess.Popen, pattern: str, lines: list[str], timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"{pattern!r} not seen; stderr so far:\n{''.join(lines)}")


def test_help_and_missing_extras(capsys, monkeypatch):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f in out for f in ["--api-key", "--max-queue", "--served-model-name",
                                                         "--port", "--max-num-seqs", "--kv-cache-memory-gb"])
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what `import uvicorn` does when it is not installed
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitfold: error: bitfold serve needs its extras (fastapi, uvicorn): ")
    assert err.count("\n") == 1
    pip = os.path.join(os.path.dirname(sys.executable), "pip")
    assert f"{pip} install" in err and "[serve]" in err, err  # the pip of the Python that runs bitfold


def test_generate_does_not_import_the_server_stack():
    code = ("import sys, bitfold.cli; bitfold.cli.build_parser(); "
            "print('fastapi' in sys.modules, 'uvicorn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
def test_sigterm_is_graceful(smollm2_path):
    proc = spawn("--port", "0", "--model", smollm2_path, "--kv-cache-memory-gb", "0.2", "--device", "cpu",
                 "--shutdown-timeout", "5", "--served-model-name", "smol")
    lines: list[str] = []
    try:
        url = read_until(proc, r"listening on (http://127\.0\.0\.1:\d+)", lines).group(1)
        m = read_until(proc, r"serving 'smol' \((.+)\) on cpu \(float32\): KV cache (\d+) tokens \((\d+) blocks x 16\)",
                       lines)
        assert m.group(1) == smollm2_path and int(m.group(2)) == int(m.group(3)) * 16
        assert httpx.get(url + "/health").status_code == 200
        body = {"model": "smol", "prompt": "Once upon a time", "temperature": 0, "stream": True, "ignore_eos": True}
        results: dict[str, list] = {}

        def stream(name: str, max_tokens: int, started: threading.Event):
            req = {**body, "max_tokens": max_tokens}
            with httpx.stream("POST", url + "/v1/completions", json=req, timeout=60) as r:
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()
                results[name] = events

        started = [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=stream, args=("long", 2000, started[0])),
                   threading.Thread(target=stream, args=("short", 4, started[1]))]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        rc = proc.wait(60)
        lines += proc.stderr.readlines()
        assert rc == 0, "".join(lines)
        short = [json.loads(e) for e in results["short"][:-1]]
        assert results["short"][-1] == "[DONE]" and short[-1]["choices"][0]["finish_reason"] == "length"
        # The long one (2000 tokens) was ended at --shutdown-timeout, not waited for: cut short with
        # the shutdown error, and [DONE].
        long = results["long"]
        assert long[-1] == "[DONE]" and json.loads(long[-2])["error"]["message"] == "the server is shutting down"
        assert "server stopped" in lines[-1] and not any("Traceback" in line for line in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_model_that_does_not_load_exits_2(tmp_path):
    missing = tmp_path / "nope.gguf"
    proc = spawn("--port", "0", "--model", str(missing))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("bitfold: error:")]
    assert len(errors) == 1 and str(missing) in errors[0], err


def test_port_taken_exits_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = spawn("--port", str(port), "--model", str(tmp_path / "never-loaded.gguf"))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("bitfold: error:")
