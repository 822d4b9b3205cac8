"""report.html in a real browser: headless Chromium renders it without console errors, the
script pages through the failures, and the screenshot is not blank.

Skipped (with the reason) when Chromium is absent; ``.ci/run`` installs the Debian package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from netmend.report.html import PAGE_SIZE, ReportData, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (apt-get install -y chromium); the browser test is skipped",
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _console(path: Path, shot: Path) -> list[str]:
    """Console messages of the page while it renders into ``shot``."""
    run = _chromium(
        f"--screenshot={shot}", "--window-size=1280,1800", "--enable-logging=stderr", "--v=0",
        path.resolve().as_uri(),
    )  # fmt: skip
    return [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def _report(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    n, m = 300, 2 * PAGE_SIZE + 5  # three pages of failures
    train_X = torch.rand(n, 1, 8, 8, generator=g)
    train_y = torch.randint(0, 4, (n,), generator=g)
    scores = np.random.default_rng(0).normal(0, 1, n)
    causes = np.argsort(-scores)[:20]
    per = np.random.default_rng(1).normal(0, 1, (m, 5))
    data = ReportData(
        title="browser test",
        kind="images",
        train_X=train_X,
        train_y=train_y,
        failures_X=torch.rand(m, 1, 8, 8, generator=g),
        failures_y=torch.randint(0, 4, (m,), generator=g),
        scores=scores,
        causes=causes,
        culprit_indices=np.random.default_rng(2).integers(0, n, (m, 5)),
        culprit_scores=-np.sort(-per, axis=1),
        accuracies={"original": {"failures": 0.0, "test": 0.9}, "repaired": {"failures": 0.5}},
        pred_before=np.zeros(m, dtype=np.int64),
        pred_after=np.ones(m, dtype=np.int64),
        suggested={int(causes[0]): 3},
        classes=["zero", "one", "two", "<three>"],
        settings={"identify": "ewc", "note": "</script><b>not markup</b>"},
    )
    return write_report(tmp_path / "report.html", data)


def test_report_renders_without_console_errors(tmp_path):
    path = _report(tmp_path)
    shot = tmp_path / "shot.png"
    messages = _console(path, shot)
    assert messages == [], messages
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables, thumbnails: not blank
    dom = _chromium("--dump-dom", path.resolve().as_uri()).stdout
    assert "page 1 of 3 (failures 1-20 of 45)" in dom  # the script ran and paged
    assert dom.count('class="card fail"') == PAGE_SIZE  # one row per failure of page 1
    shown = re.sub(r"<script.*?</script>", "", dom, flags=re.S)  # the rendered page only
    assert "&lt;three&gt;" in shown and "<three>" not in shown  # names are escaped
    assert "<b>not markup</b>" not in shown


def test_console_errors_are_caught(tmp_path):
    """The check above can fail: a page with a script error is reported."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    messages = _console(bad, tmp_path / "bad.png")
    assert any("undefinedFunction" in m for m in messages)
