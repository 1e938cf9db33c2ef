"""Long loads and quantizations show their progress with an ETA: a tqdm bar on a terminal, a
line every few seconds in a log; nothing at all for work done within a couple of seconds."""
from __future__ import annotations

import io
import re
import time

from bitfold.progress import LineProgress, progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_with_eta_in_a_log():
    log = io.StringIO()
    with progress(10, "loading GGUF", unit="tensor", unit_scale=False, file=log, delay=0.05, every=0.05) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(10):
            time.sleep(0.02)
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) >= 3, lines
    for line in lines:
        assert re.match(r"\[bitfold\] loading GGUF: +\d+% \d+/10 \[\d\d:\d\d<\d\d:\d\d, \d", line), line
    assert "10/10" in lines[-1] and "100%" in lines[-1]


def test_quick_work_prints_nothing():
    for file in (io.StringIO(), FakeTTY()):
        with progress(1000, "loading weights", file=file) as bar:
            bar.update(1000)
        assert file.getvalue() == ""


def test_a_bar_on_a_terminal():
    tty = FakeTTY()
    with progress(4, "quantizing", unit="tensor", unit_scale=False, file=tty, delay=0.0) as bar:
        for _ in range(4):
            bar.update(1)
    assert "quantizing" in tty.getvalue() and "\r" in tty.getvalue()


def test_the_loaders_report_progress(tiny_model_dir, smollm2_path, monkeypatch, capsys):
    """Both loaders count through the progress utility; the engine consumes (and quantizes) each
    tensor as it arrives, so the count covers the whole load."""
    import bitfold.progress as prog
    from bitfold.loader import open_model

    monkeypatch.setattr(prog, "DELAY_S", 0.0)
    monkeypatch.setattr(prog, "LINE_EVERY_S", 0.0)
    for path, desc, n in [(tiny_model_dir, "loading weights", None), (smollm2_path, "loading GGUF", 3)]:
        weights = open_model(str(path)).weights()
        for i, _ in enumerate(weights, 1):
            if i == n:
                break
        weights.close()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith(f"[bitfold] {desc}: ")]
        assert len(lines) >= (n or 3) and "B/s]" in lines[-1], err
