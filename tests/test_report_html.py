"""The HTML report is one self-contained file: plots embedded as PNG data URIs, no links, no scripts."""
from __future__ import annotations

import base64
import re

import pytest

from batchdeck.cli import main
from tests.test_replay import PRESET


@pytest.fixture(scope="module")
def html_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    preset = root / "replay-test.yaml"
    preset.write_text(PRESET)
    out, page = root / "r.json", root / "r.html"
    assert main(["replay", str(preset), "--headless", "--quiet", "--report", str(out), "--html", str(page)]) == 0
    return page.read_text(encoding="utf-8")


def test_html_is_self_contained(html_run):
    page = html_run
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 2  # the time series and the per-phase bars
    for src in images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "<script" not in lowered
    assert "<link" not in lowered and "@import" not in lowered and "url(" not in lowered


def test_html_has_tables(html_run):
    page = html_run
    for text in ("replay-test", "generation throughput (tok/s)", "TTFT p99", "ITL p99", "TPOT p50 (per request)",
                 "phase 0: start",
                 "phase 1: chunk_size=32", "phase 2: max_num_seqs=6, policy=sjf", "SLO met: batch",
                 "service tokens: c", "Timeline", "pause 0.2 s", "config_change"):
        assert text in page, text
