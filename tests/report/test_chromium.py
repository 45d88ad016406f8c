"""report.html as a browser renders it: Debian's headless Chromium loads the page, the test reads
the rendered headings and numbers and whether every embedded plot decoded, and saves a screenshot
(``SLIMKIT_REPORT_SCREENSHOT=path.png`` keeps a copy)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)"
)

# appended to a copy of the page: records what the browser rendered into the DOM it dumps
PROBE = """<script>
addEventListener("load", () => {
  const imgs = [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);
  const h2 = [...document.querySelectorAll("h2")].map(h => h.innerText.trim());
  document.body.setAttribute("data-probe", JSON.stringify({imgs, h2}));
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_chromium_renders_every_section_and_plot(searched: Path, tmp_path: Path) -> None:
    page = tmp_path / "probe.html"
    page.write_text((searched / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    res = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the probe did not run: " + dom[:500]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["h2"] == [
        "Chosen model against the original", "Search: the Pareto front", "What each step changed",
        "Per-layer roofline", "Per-layer sensitivity", "Reproduce it", "Measured on", "Files",
    ]  # fmt: skip
    alts = [alt for alt, *_ in probe["imgs"]]
    assert alts == ["source against result", "Pareto front", "roofline", "sensitivity"]
    for alt, complete, width, height in probe["imgs"]:
        assert complete and width > 300 and height > 150, (alt, width, height)  # decoded
    m = json.loads((searched / "metrics.json").read_text())["measured"]
    assert f"{m['params']['result']:,}" in dom
    assert "trial 4 meets every constraint" in dom and "#4 (chosen)" in dom


def test_chromium_screenshot_is_not_blank(searched: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,3600",
                    (searched / "report.html").as_uri())  # fmt: skip
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    keep = os.environ.get("SLIMKIT_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 3600)
    small = img.resize((320, 900))
    pixels = list(small.getdata())
    background = sum(1 for p in pixels if min(p) > 240) / len(pixels)
    assert background < 0.9  # cards, tables, plots and the dark recipe block are drawn
    # the result's bars (#2563eb) and the Pareto front (#dc2626) come from the decoded plots
    blue = sum(1 for r, g, b in pixels if abs(r - 37) < 30 and abs(g - 99) < 30 and b > 200)
    red = sum(1 for r, g, b in pixels if r > 190 and g < 80 and b < 80)
    assert blue > 30 and red > 3, (blue, red)
