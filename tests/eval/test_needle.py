"""Passkey retrieval: trial construction (no model), then a short run with SmolLM2 end to end
(engine, JSON, markdown, a heatmap per configuration and the side-by-side figure)."""
from __future__ import annotations

import json
import os

import pytest

from bitfold.cli import main
from bitfold.errors import BitfoldError
from bitfold.eval.needle import (NEEDLE, Trial, _insert, accuracy_grid, is_correct, make_trials, parse_depths,
                                 parse_lengths)


def test_parse_lengths_and_depths():
    assert parse_lengths("1k,2k,512,1.5k,16K") == [512, 1024, 1536, 2048, 16384]
    assert parse_depths("1, 0,0.25") == [0.0, 0.25, 1.0]
    for bad in ("", "1kb", "32", "-1"):
        with pytest.raises(BitfoldError, match="--lengths"):
            parse_lengths(bad)
    for bad in ("", "x", "1.5", "-0.1"):
        with pytest.raises(BitfoldError, match="--depths"):
            parse_depths(bad)


def test_needle_goes_in_at_a_sentence_boundary():
    hay = "One fish. Two fish. Red fish. Blue fish."
    assert _insert(hay, "N.", 0.0) == ("N. " + hay, 0)
    assert _insert(hay, "N.", 1.0) == (hay + " N.", len(hay) + 1)
    text, at = _insert(hay, "N.", 0.5)
    assert text == "One fish. Two fish. N. Red fish. Blue fish." and text[at:].startswith("N.")


def test_is_correct_wants_the_whole_number():
    assert is_correct(" 48213.", "48213") and is_correct("The passkey is 48213", "48213")
    assert not is_correct(" 4821.", "48213") and not is_correct(" 148213", "48213")


def test_accuracy_grid_averages_seeds_and_leaves_unrun_cells_empty():
    trials = [Trial(256, d, seed, "12345", [], d) for seed in (0, 1) for d in (0.0, 1.0)][:3]  # as with --limit 3
    grid = accuracy_grid(trials, [True, False, False], [256, 512], [0.0, 1.0])
    assert grid[0] == [0.5, 0.0]
    assert all(v != v for v in grid[1])  # NaN: no trial of length 512


def test_trials_hit_their_lengths_and_depths(smollm2_tokenizer, wiki_docs):
    tok = smollm2_tokenizer
    trials = make_trials(tok, wiki_docs, [256, 1024], [0.0, 0.5, 1.0], seeds=[0, 1])
    assert len(trials) == 12
    for t in trials:
        text = tok.decode(t.prompt_ids, skip_special_tokens=False)
        assert abs(len(t.prompt_ids) - t.length) <= 8, (len(t.prompt_ids), t.length)
        assert NEEDLE.format(key=t.key) in text and text.count(t.key) == 1
        assert text.startswith("<|im_start|>") and text.endswith("The secret passkey is")
        assert abs(t.needle_depth - t.depth) < (0.25 if t.length == 256 else 0.1), t
    again = make_trials(tok, wiki_docs, [256, 1024], [0.0, 0.5, 1.0], seeds=[0, 1])
    assert [t.prompt_ids for t in again] == [t.prompt_ids for t in trials]  # seeded, reproducible
    plain = make_trials(tok, wiki_docs, [256], [0.5], seeds=[0], chat=False)
    assert "<|im_start|>" not in tok.decode(plain[0].prompt_ids, skip_special_tokens=False)


def test_too_short_a_length_is_an_error(smollm2_tokenizer, wiki_docs):
    with pytest.raises(BitfoldError, match="too short"):
        make_trials(smollm2_tokenizer, wiki_docs, [80], [0.5], seeds=[0])


def test_short_needle_run_end_to_end(smollm2_path, wiki_docs, tmp_path, capsys):
    rc = main(["eval", "needle", "--model", smollm2_path, "--device", "cpu", "--lengths", "256,512",
               "--depths", "0,1", "--seeds", "1", "--config", "fp32:dtype=float32", "--out", str(tmp_path),
               "--name", "nd", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "| fp32 | 256 |" in out and "| fp32 | 512 |" in out
    names = sorted(os.listdir(tmp_path))
    assert names == ["nd-compare.png", "nd-fp32.png", "nd.json", "nd.md"]
    for n in names:
        if n.endswith(".png"):
            assert (tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "nd.json").read_text())
    assert res["lengths"] == [256, 512] and res["depths"] == [0.0, 1.0] and res["chat"] is True
    assert len(res["trials"]) == 4 and res["configs"][0]["engine"]["dtype"] == "float32"
    grid = res["configs"][0]["grid"]
    assert len(grid) == 2 and all(len(row) == 2 for row in grid)
    # SmolLM2-135M finds a passkey in a 256-512 token haystack: a broken prompt or scorer would not
    assert res["configs"][0]["accuracy"] >= 0.75, res["trials"]
