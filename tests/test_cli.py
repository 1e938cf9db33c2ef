"""The `bitfold` command line: bad input is one `bitfold: error: ...` line on stderr and exit
status 2 (no traceback, nothing on stdout); good input streams the same text as the API.

Cases that need no model, or only the tiny one, call `bitfold.cli.main` in-process; a few run
`python -m bitfold.cli` in a subprocess to check the real exit status and output streams."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bitfold import SamplingParams
from bitfold.cli import main

PROMPT = "1 2 3"  # SmolLM2 ids 33 216 34 216 35: inside the tiny model's 320-token vocabulary


def run_main(capsys, argv, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def run_process(argv, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitfold.cli", *argv], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error_line(rc: int, out: str, err: str, *needles: str) -> str:
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("bitfold: error: "), lines[0]
    assert "Traceback" not in err
    assert out == "", f"stdout should be empty on bad input, got {out!r}"
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tiny_args(tiny_model_dir, *extra: str) -> list[str]:
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--num-kv-blocks", "64", "--block-size", "4", *extra]


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_dir):
    from bitfold.loader.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_folder(str(tiny_model_dir))
    assert all(t < 320 for t in tok.encode(PROMPT))
    return tok


@pytest.fixture(scope="module")
def tiny_api(tiny_model_dir):
    from bitfold import LLM

    return LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=64, block_size=4)


# ---- bad input, no model needed ------------------------------------------------------------------


def test_missing_model_path(capsys, tmp_path):
    missing = str(tmp_path / "absent.gguf")
    rc, out, err = run_main(capsys, ["generate", PROMPT, "--model", missing])
    assert_one_error_line(rc, out, err, missing)


def test_not_a_gguf_file(capsys, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    rc, out, err = run_main(capsys, ["generate", PROMPT, "--model", str(path)])
    assert_one_error_line(rc, out, err, str(path), "GGUF")


def test_unknown_architecture_folder(capsys, tiny_model_dir, tmp_path):
    folder = tmp_path / "foo"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    rc, out, err = run_main(capsys, ["generate", PROMPT, "--model", str(folder), "--device", "cpu"])
    assert_one_error_line(rc, out, err, "FooForCausalLM", "config.json", "LlamaForCausalLM")


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "-1"], "temperature"), (["--temperature", "abc"], "--temperature"),
    (["--temperature", "nan"], "temperature"), (["--top-p", "2"], "top_p"), (["--top-p", "0"], "top_p"),
    (["--top-k", "-2"], "top_k"), (["--max-tokens", "0"], "max_tokens"), (["--max-tokens", "1.5"], "--max-tokens"),
    (["--stop", ""], "stop"), (["--seed", "x"], "--seed"), (["--block-size", "3"], "block_size"),
    (["--device", "tpu"], "--device"), (["--no-such-flag"], "--no-such-flag"),
])
def test_invalid_flags(capsys, flags, needle):
    rc, out, err = run_main(capsys, ["generate", PROMPT, *flags])
    assert_one_error_line(rc, out, err, needle)


@pytest.mark.parametrize("argv", [[], ["generate"], ["bogus"], ["chat", "extra-positional"]])
def test_usage_errors_are_one_line(capsys, argv):
    rc, out, err = run_main(capsys, argv)
    assert_one_error_line(rc, out, err)


def test_help_still_works(capsys):
    rc, out, err = run_main(capsys, ["generate", "--help"])
    assert rc == 0 and "--max-model-len" in out and "--temperature" in out


# ---- the tiny model, in-process ------------------------------------------------------------------


def test_prompt_too_long(capsys, tiny_model_dir, tiny_tok):
    prompt = " ".join(str(i % 10) for i in range(12))  # 23 tokens
    n = len(tiny_tok.encode(prompt))
    assert n > 16 and all(t < 320 for t in tiny_tok.encode(prompt))
    rc, out, err = run_main(capsys, ["generate", prompt, *tiny_args(tiny_model_dir, "--max-model-len", "16")])
    assert_one_error_line(rc, out, err, str(n), "16", "context")


def test_generate_on_the_tiny_model(capsys, tiny_model_dir, tiny_api):
    rc, out, err = run_main(capsys, ["generate", PROMPT, *tiny_args(tiny_model_dir, "--max-tokens", "6")])
    assert rc == 0, err
    assert out.startswith(PROMPT)
    ref = tiny_api.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6))[0]
    assert out == PROMPT + ref.text + "\n"
    assert "Traceback" not in err and "bitfold: error" not in err


def test_generate_reads_the_prompt_from_stdin_and_honours_stop(capsys, monkeypatch, tiny_model_dir, tiny_api):
    full = tiny_api.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].text
    if len(full) < 4:
        pytest.skip(f"the tiny model's output {full!r} is too short for a stop string")
    stop = full[2:4]
    rc, out, err = run_main(capsys, ["generate", "-", *tiny_args(tiny_model_dir, "--max-tokens", "12", "--stop", stop)],
                            stdin=PROMPT, monkeypatch=monkeypatch)
    assert rc == 0, err
    cut = tiny_api.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0]
    assert out == PROMPT + cut.text + "\n"
    assert stop not in out[len(PROMPT):]


@pytest.fixture(scope="module")
def tiny_chat_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a chat template whose text stays inside its 320-token vocabulary."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_chat_from_stdin(capsys, monkeypatch, tiny_chat_dir):
    rc, out, err = run_main(capsys, ["chat", *tiny_args(tiny_chat_dir, "--max-tokens", "4", "--temperature", "0")],
                            stdin=f"{PROMPT}\n/exit\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    assert out.startswith("> ") and out.count("> ") >= 2  # one prompt per line read
    assert "bitfold: error" not in err and "Traceback" not in err


def test_chat_ends_at_eof_and_survives_a_bad_turn(capsys, monkeypatch, tiny_model_dir, tiny_chat_dir):
    # "hi" is token 6004, outside the tiny vocabulary: that turn fails, the session goes on.
    rc, out, err = run_main(capsys, ["chat", *tiny_args(tiny_chat_dir, "--max-tokens", "3", "--temperature", "0")],
                            stdin=f"hi\n{PROMPT}\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    errors = [line for line in err.splitlines() if line.startswith("bitfold: error:")]
    assert len(errors) == 1 and "vocabulary" in errors[0], err
    assert out.count("> ") == 3  # "hi", PROMPT, then EOF
    # With SmolLM2's own template (a long system prompt) every turn is outside the vocabulary.
    rc, out, err = run_main(capsys, ["chat", *tiny_args(tiny_model_dir)], stdin="hi\n/exit\n", monkeypatch=monkeypatch)
    assert rc == 0 and err.count("bitfold: error:") == 1


# ---- real processes ----------------------------------------------------------------------------


def test_process_error_exit_status(tmp_path):
    missing = str(tmp_path / "nothing-here")
    p = run_process(["generate", PROMPT, "--model", missing])
    assert_one_error_line(p.returncode, p.stdout, p.stderr, missing)
    p = run_process(["generate", PROMPT, "--top-p", "2"])
    assert_one_error_line(p.returncode, p.stdout, p.stderr, "top_p")


def test_process_chat_on_the_tiny_model(tiny_chat_dir):
    p = run_process(["chat", *tiny_args(tiny_chat_dir, "--max-tokens", "3")], stdin="hi\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr


def test_process_generate_on_the_default_model(smollm2_default):
    prompt = "The capital of France is"
    p = run_process(["generate", prompt, "--max-tokens", "8", "--device", "cpu", "--kv-cache-memory-gb", "0.25"])
    assert p.returncode == 0, p.stderr
    ref = smollm2_default.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0]
    assert p.stdout == prompt + ref.text + "\n"
    assert "Paris" in p.stdout


def test_process_generate_chat_on_the_default_model(smollm2_default):
    question = "What is the capital of France?"
    p = run_process(["generate", question, "--chat", "--max-tokens", "8", "--device", "cpu",
                     "--kv-cache-memory-gb", "0.25"])
    assert p.returncode == 0, p.stderr
    ref = smollm2_default.chat([{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=8))[0]
    assert p.stdout == ref.text + "\n"
    assert "Paris" in p.stdout
