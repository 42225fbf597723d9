"""The HTML report as a reader sees it: rendered by headless Chromium at 1280 px, every figure readable.

Needs Debian's ``chromium`` package (``apt-get install chromium``; ``.ci/run`` installs it); skipped
with that reason where it is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from depict_analysis.models.pretrained import load_default
from depict_analysis.outputs import FIGURE_DPI
from depict_analysis.report import MIN_TEXT_PX, write_report
from depict_analysis.suite import SuiteSettings, run_suite

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                                                          "the report's rendering check needs a real browser")
WIDTH = 1280
FAST = SuiteSettings(num_images=4, examples=1, sigmas=(0, 0.05, 1.0), draws=1, batch_size=4, resamples=100, baseline_seeds=2)

# Runs in the page once loaded: every figure's rendered and natural widths, and the page's own width.
MEASURE = """<script>
window.addEventListener("load", () => {
  for (const img of document.querySelectorAll("figure img")) {
    img.dataset.rendered = img.clientWidth;  // the image itself, without its border
    img.dataset.natural = img.naturalWidth;
    img.dataset.box = img.parentElement.getBoundingClientRect().width;
  }
  document.body.dataset.scrollWidth = document.documentElement.scrollWidth;
});
</script>"""


def chromium(*args: str) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000",
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


class Figures(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.body: dict[str, str] = {}
        self.sections: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "body":
            self.body = attrs
        elif tag == "h2" and "id" in attrs:
            self.sections.append(attrs["id"])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    models = [load_default(name)[0] for name in ("depict-sa", "segmenter")]
    from depict_analysis.models.sources import LoadedModel  # noqa: PLC0415

    result = run_suite([LoadedModel.of(models[0], "SA", "builtin:depict-sa"), LoadedModel.of(models[1], "Seg", "builtin:segmenter")],
                       out / "data", FAST, progress=False, command="pytest")
    page = write_report(result, out / "data", out / "report.html")
    measured = out / "measured.html"
    measured.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    dom = chromium(f"--window-size={WIDTH},900", "--dump-dom", measured.as_uri())
    parser = Figures()
    parser.feed(dom)
    shot = out / "report.png"
    chromium(f"--window-size={WIDTH},3000", f"--screenshot={shot}", page.as_uri())
    return result, parser, shot


def test_every_analysis_of_the_run_is_on_the_page(rendered):
    result, page, _ = rendered
    assert set(result.files) <= set(page.sections)
    figures = {image["alt"] for image in page.images}
    assert {Path(f).stem for files in result.files.values() for f in files if f.endswith(".png")} == figures


def test_every_figure_shows_its_text_at_10_px_or_more_at_1280_px(rendered):
    _, page, _ = rendered
    assert page.images
    for image in page.images:
        rendered_px, natural_px = float(image["data-rendered"]), float(image["data-natural"])
        text_px = float(image["data-min-font-pt"]) * FIGURE_DPI / 72 * rendered_px / natural_px
        assert text_px >= 10, (image["alt"], text_px)


def test_narrow_figures_are_not_blown_up_and_only_wide_ones_scroll(rendered):
    _, page, _ = rendered
    for image in page.images:
        rendered_px, natural_px, box = (float(image[k]) for k in ("data-rendered", "data-natural", "data-box"))
        printed = natural_px / FIGURE_DPI * 96
        needed = printed * max(1.0, MIN_TEXT_PX / (float(image["data-min-font-pt"]) * 96 / 72))
        assert rendered_px == pytest.approx(needed, abs=1), image["alt"]  # printed size, enlarged only for its text
        assert box <= WIDTH  # a figure wider than the page scrolls inside its own box
    assert int(page.body["data-scroll-width"]) <= WIDTH  # the page itself never scrolls sideways


def test_the_screenshot_shows_the_page(rendered):
    _, _, shot = rendered
    with PIL.Image.open(shot) as image:
        assert image.width == WIDTH
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 128).mean() > 0.01  # text and figures, not a blank page
    assert re.search(r"\.png$", shot.name)
