"""`bitfold eval ...` on the command line: bad input is one `bitfold: error:` line and exit 2,
checked before any model loads; a tiny ppl run writes its JSON, markdown and figure."""
from __future__ import annotations

import json

import pytest

from bitfold.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc, err, words):
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitfold: error: "), err
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("argv, words", [
    (["ppl", "--config", "x:fooo=1"], "unknown engine setting 'fooo'"),
    (["ppl", "--config", "x:dtype=float32", "--config", "x:dtype=bfloat16"], "used twice"),
    (["ppl", "--corpus", "nope"], "unknown corpus 'nope'"),
    (["ppl", "--windows", "0"], "--windows must be at least 1"),
    (["ppl", "--bogus"], "unrecognized arguments: --bogus"),
    (["ppl", "--prefill", "511"], "--prefill 511 must leave at least one decode step"),
    (["ppl", "--out", "/dev/null/x"], "cannot create the results folder"),
    (["needle", "--corpus", "nope"], "unknown corpus 'nope'"),
    (["needle", "--lengths", "1q"], "--lengths: '1q' is not a token count"),
    (["needle", "--depths", "2"], "--depths '2'"),
    (["needle", "--config", "k:kv_cache=int3"], "unknown KV cache 'int3'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    rc, out, err = run(capsys, "eval", *argv)
    assert out == ""
    assert_one_error_line(rc, err, words)


def test_lengths_beyond_the_model_context(capsys, smollm2_path, wiki_docs):
    rc, _, err = run(capsys, "eval", "needle", "--model", smollm2_path, "--lengths", "16k")
    assert_one_error_line(rc, err, "exceed the model's context length 8192")
    rc, _, err = run(capsys, "eval", "ppl", "--model", smollm2_path, "--context", "9000")
    assert_one_error_line(rc, err, "exceeds the model's context length 8192")


def test_corpora_lists_what_is_installed(capsys, wiki_docs):
    rc, out, _ = run(capsys, "eval", "corpora")
    assert rc == 0
    assert "wiki       installed" in out and "summaries_en-us.json" in out
    assert "sotu" in out and "moby-dick" in out


def test_tiny_ppl_run_writes_results(capsys, smollm2_path, wiki_docs, tmp_path):
    rc, out, err = run(capsys, "eval", "ppl", "--model", smollm2_path, "--device", "cpu", "--config", "a:dtype=float32",
                       "--windows", "4", "--limit", "2", "--context", "24", "--out", str(tmp_path), "--name", "p",
                       "--no-progress")
    assert rc == 0, err
    assert "| a | dtype=float32 |" in out and "2 windows x 24 tokens" in out
    res = json.loads((tmp_path / "p.json").read_text())
    [cfg] = res["configs"]
    assert cfg["tokens"] == 2 * 23 and cfg["kl_mean"] == 0.0 and cfg["engine"]["kv_cache"] == "dense"
    assert res["windows"]["count"] == 2 and len(res["positions"]["a"]["nll"]) == 24
    assert (tmp_path / "p.md").read_text().startswith("# bitfold eval ppl")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
