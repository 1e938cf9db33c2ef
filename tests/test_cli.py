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


@pytest.mark.slow
def test_process_generate_on_the_default_model(smollm2_default):
    prompt = "The capital of France is"
    p = run_process(["generate", prompt, "--max-tokens", "8", "--device", "cpu", "--kv-cache-memory-gb", "0.25"])
    assert p.returncode == 0, p.stderr
    ref = smollm2_default.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0]
    assert p.stdout == prompt + ref.text + "\n"
    assert "Paris" in p.stdout


@pytest.mark.slow
def test_process_generate_chat_on_the_default_model(smollm2_default):
    question = "What is the capital of France?"
    p = run_process(["generate", question, "--chat", "--max-tokens", "8", "--device", "cpu",
                     "--kv-cache-memory-gb", "0.25"])
    assert p.returncode == 0, p.stderr
    ref = smollm2_default.chat([{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=8))[0]
    assert p.stdout == ref.text + "\n"
    assert "Paris" in p.stdout


# ---- text that is not UTF-8 ------------------------------------------------------------------------


def test_prompt_that_is_not_utf8_is_one_error_line(tiny_model_dir):
    """Bytes that are not UTF-8 (latin-1 'é', a stray 0xff), from argv and from stdin: refused before
    the model loads, naming the first bad byte and where it is."""
    bad = b"caf\xe9 \xff"
    for argv, stdin in [([bad], None), (["-"], bad)]:
        p = subprocess.run([sys.executable, "-m", "bitfold.cli", "generate", *argv, *tiny_args(tiny_model_dir)],
                           input=stdin, capture_output=True, timeout=120)
        out, err = p.stdout.decode(), p.stderr.decode()
        line = assert_one_error_line(p.returncode, out, err, "not valid UTF-8", "0xE9", "byte 3")
        assert "Traceback" not in line


def test_chat_line_that_is_not_utf8_is_one_bad_turn(capsys, monkeypatch, tiny_chat_dir):
    """A line that is not UTF-8 in `bitfold chat` fails that turn only, as a too-long one does."""
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n" + PROMPT.encode() + b"\n/exit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    rc = main(["chat", *tiny_args(tiny_chat_dir, "--max-tokens", "3", "--temperature", "0")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    errors = [line for line in err.splitlines() if line.startswith("bitfold: error:")]
    assert len(errors) == 1 and "not valid UTF-8" in errors[0] and "0xE9" in errors[0], err
    assert out.count("> ") == 3  # the bad line, PROMPT, /exit


# ---- help and flags ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "quantize", "eval ppl"])
def test_help_shows_every_default_and_every_flag_has_help(capsys, command):
    """Each flag with a value says what it does and its default (argparse prints neither unless asked)."""
    import argparse

    from bitfold.cli import build_parser

    parser = build_parser()
    for word in command.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented, undocumented
    rc, out, err = run_main(capsys, [*command.split(), "--help"])
    assert rc == 0
    if command in ("generate", "chat", "serve"):
        flat = " ".join(out.split())
        assert "(default: 1024)" in flat and "--max-num-seqs MAX_NUM_SEQS" in flat
        assert "most requests decoded together in one step (default: 128)" in flat
        assert "(default: None)" not in flat


def test_verbose_before_or_after_the_subcommand():
    from bitfold.cli import build_parser

    for argv in (["-v", "generate", PROMPT], ["generate", PROMPT, "-v"], ["generate", "--verbose", PROMPT],
                 ["serve", "-v"], ["eval", "ppl", "-v"], ["-v", "eval", "ppl"],
                 ["quantize", "--format", "int4", "--out", "x", "-v"]):
        assert build_parser().parse_args(argv).verbose is True, argv
    for argv in (["generate", PROMPT], ["serve"], ["eval", "ppl"]):
        assert build_parser().parse_args(argv).verbose is False, argv


def test_bad_weights_lists_each_format_once(capsys):
    rc, out, err = run_main(capsys, ["generate", PROMPT, "--weights", "int7"])
    line = assert_one_error_line(rc, out, err, "int7", "int4", "dense")
    assert line.count("auto") == 1, line


def test_unknown_architecture_is_named_before_missing_fields(capsys, tmp_path):
    """A config.json of another family (GPT-2 spells its fields n_embd, n_head...) names the
    architecture, not the first Llama field it lacks."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 768,
                                                      "n_head": 12, "n_layer": 12, "vocab_size": 50257}))
    rc, out, err = run_main(capsys, ["generate", PROMPT, "--model", str(tmp_path)])
    assert_one_error_line(rc, out, err, "GPT2LMHeadModel", "not supported", "LlamaForCausalLM")


# ---- weights that rounding breaks ------------------------------------------------------------------


def test_rounding_to_two_bits_or_fewer_warns(caplog, tiny_model_dir, tmp_path):
    """--weights int2 (int1, ternary) rounds every layer to nearest without calibration, which
    breaks ordinary models: one warning before loading, naming what works instead. int3/int4 and a
    checkpoint already stored in the format load silently."""
    import logging

    from bitfold import LLM
    from bitfold.quantize import quantize

    def warnings_for(**kw) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bitfold"):
            LLM(str(kw.pop("model", tiny_model_dir)), device="cpu", num_kv_blocks=8, **kw)
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    for weights in ("int2", "int1-g32", "ternary"):
        (msg,) = warnings_for(weights=weights)
        assert f"--weights {weights}:" in msg and "int4" in msg and "calibrated" in msg and "\n" not in msg, msg
    assert warnings_for(weights="int4") == [] and warnings_for(weights="int3") == []
    folder = tmp_path / "int2"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bitfold"):
        quantize(str(tiny_model_dir), "int2", str(folder))
    assert any("--format int2:" in r.getMessage() for r in caplog.records)
    assert warnings_for(model=folder) == [] and warnings_for(model=folder, weights="int2-g64") == []
