"""Headless Chromium for tests: load a local page, dump its DOM, take a screenshot.

Debian's ``chromium`` (``scripts/ensure_test_tools.sh`` installs it). Every run gets a
fresh profile folder and no network services (no sync, updates, QUIC, background
fetches), so a page that needs the network shows up as missing content, not a hang.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")
INSTALL_HINT = "install it with `bash scripts/ensure_test_tools.sh` (Debian package chromium)"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--hide-scrollbars",
)
# A console message as chromium logs it (--enable-logging=stderr):
#   [...:INFO:CONSOLE(12)] "text", source: file:///...
_CONSOLE = re.compile(r":(?:INFO|WARNING|ERROR|VERBOSE\d*):CONSOLE[^\]]*\]\s*(.*)")


def find_chromium() -> str | None:
    """The chromium executable, or ``None``."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass(frozen=True)
class PageRun:
    """What chromium printed for one page."""

    dom: str
    console: list[str]  # console messages of the page
    stderr: str

    @property
    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions."""
        lines = [ln for ln in self.stderr.splitlines() if "ERROR:CONSOLE" in ln]
        lines += [m for m in self.console if "Uncaught" in m]
        return lines


def _run(executable: str, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="housing-chromium-") as profile:
        return subprocess.run(
            [executable, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


# A check run from the test side (the page ships no script): marks ``<body>`` with how many
# ``svg.chart`` figures got a size (``data-figures="3/3"``) and ``data-render-check``.
FIGURE_CHECK = """
(function () {
  var charts = document.querySelectorAll("svg.chart"), sized = 0;
  for (var i = 0; i < charts.length; i++) {
    var box = charts[i].getBoundingClientRect();
    if (box.width > 0 && box.height > 0) { sized++; }
  }
  document.body.setAttribute("data-figures", sized + "/" + charts.length);
  document.body.setAttribute("data-render-check", sized === charts.length ? "ok" : "failed");
})();
"""


# A layout check run from the test side: writes ``data-layout`` on ``<body>``, a JSON object
# with the viewport's page height, each table wrapper's scroll and client width (a table
# cut behind a scrollbar has scrollWidth > clientWidth), whether each figure legend lies
# inside its SVG, and the text colour of each metric card's value.
LAYOUT_CHECK = """
(function () {
  function box(el) { var r = el.getBoundingClientRect();
    return [r.left, r.top, r.right, r.bottom]; }
  var out = {height: document.documentElement.scrollHeight, tables: [], legends: [], kpis: []};
  document.querySelectorAll(".table-wrap").forEach(function (w) {
    var section = w.closest("section");
    out.tables.push({section: section ? section.id : "", scroll: w.scrollWidth,
                     client: w.clientWidth});
  });
  document.querySelectorAll("svg.chart").forEach(function (svg) {
    var outer = box(svg);
    svg.querySelectorAll("g[id*='legend_']").forEach(function (g) {
      var b = box(g);
      out.legends.push({id: g.id, inside: b[0] >= outer[0] - 1 && b[1] >= outer[1] - 1 &&
                        b[2] <= outer[2] + 1 && b[3] <= outer[3] + 1, legend: b, svg: outer});
    });
  });
  document.querySelectorAll(".kpi").forEach(function (k) {
    var value = k.querySelector(".value");
    out.kpis.push({label: k.querySelector(".label").textContent, cls: k.className,
                   color: getComputedStyle(value).color, text: value.textContent});
  });
  document.body.setAttribute("data-layout", JSON.stringify(out));
})();
"""


def layout(run: PageRun) -> dict[str, Any]:
    """The ``data-layout`` object :data:`LAYOUT_CHECK` left on ``<body>``."""
    found = re.search(r'<body[^>]*\sdata-layout="([^"]*)"', run.dom)
    if found is None:
        raise AssertionError("LAYOUT_CHECK did not run (no data-layout on <body>)")
    data: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return data


def dump_dom(
    executable: str,
    page: Path,
    timeout: float = 60.0,
    script: str | None = None,
    size: tuple[int, int] = (1400, 900),
) -> PageRun:
    """Load ``page`` in a ``size`` window (CSS pixels) and return the DOM after its scripts
    ran, plus its console lines.

    ``script``: run after the page's own content, from a copy of ``page`` next to it (the
    page itself is left as it is).
    """
    if script is not None:
        text = page.read_text(encoding="utf-8")
        at = text.rindex("</body>")
        page = page.with_name(f".{page.stem}.check{page.suffix}")
        page.write_text(f"{text[:at]}<script>{script}</script>{text[at:]}", encoding="utf-8")
    try:
        proc = _run(
            executable,
            [
                "--enable-logging=stderr",
                "--v=0",
                f"--window-size={size[0]},{size[1]}",
                "--virtual-time-budget=3000",
                "--dump-dom",
                page.resolve().as_uri(),
            ],
            timeout,
        )
    finally:
        if script is not None:
            page.unlink(missing_ok=True)
    if proc.returncode != 0 or "<html" not in proc.stdout:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"chromium --dump-dom exited {proc.returncode}:\n{tail}")
    console = [m.group(1) for ln in proc.stderr.splitlines() if (m := _CONSOLE.search(ln))]
    return PageRun(dom=proc.stdout, console=console, stderr=proc.stderr)


def screenshot(
    executable: str,
    page: Path,
    png: Path,
    size: tuple[int, int] = (1200, 3000),
    timeout: float = 60.0,
) -> Path:
    """Render ``page`` at ``size`` (width, height in CSS pixels) into ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = _run(
        executable,
        [
            f"--screenshot={png.resolve()}",
            f"--window-size={size[0]},{size[1]}",
            "--virtual-time-budget=3000",
            page.resolve().as_uri(),
        ],
        timeout,
    )
    if proc.returncode != 0 or not png.is_file():
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"chromium --screenshot exited {proc.returncode}:\n{tail}")
    return png


def distinct_colors(png: Path, step: int = 2) -> int:
    """How many distinct RGB colors the PNG has (every ``step``-th pixel each way)."""
    import numpy as np
    from matplotlib import image

    pixels = np.asarray(image.imread(str(png)))[::step, ::step, :3]
    if pixels.dtype != np.uint8:
        pixels = np.rint(pixels * 255).astype(np.uint8)
    flat = pixels.reshape(-1, 3).astype(np.uint32)
    codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    return int(np.unique(codes).size)


def png_size(png: Path) -> tuple[int, int]:
    """(width, height) from the PNG header."""
    header = png.read_bytes()[:24]
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{png}: not a PNG file")
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
