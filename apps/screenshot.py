"""A headless-Chromium screenshot of the app: the README's picture, and what the browser test looks at.

    python -m apps.screenshot           # erases two concepts on the toy model, launches the app, writes
                                        # apps/screenshot.png

The system Chromium (Debian's `chromium`) is driven through Playwright's Python API; Playwright's own browser
download is never used. The screenshot is taken only once the comparison gallery shows every generated image
loaded in the page (base and each preloaded edit), so it never catches the page still generating.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

WINDOW = (1100, 1300)
GALLERY = "#comparison"  # the elem_id of the diffusion tab's gallery in apps/app.py

# Every image of the gallery, with its caption, once each image has loaded (naturalWidth > 0).
_RENDERED = """(selector) => {
    const items = [...document.querySelectorAll(`${selector} .gallery-item`)];
    return items.map((item) => {
        const img = item.querySelector("img");
        const label = item.querySelector(".caption-label");
        return {loaded: !!img && img.complete && img.naturalWidth > 0, width: img ? img.naturalWidth : 0,
                caption: label ? label.textContent.trim() : ""};
    });
}"""
_READY = f"""([selector, expected]) => {{
    const items = ({_RENDERED})(selector);
    const busy = document.querySelector(`${{selector}} .eta-bar, ${{selector}} .progress-text`);
    return items.length >= expected && items.every((i) => i.loaded) && !busy;
}}"""


@dataclass
class Shot:
    """The PNG written, and what the page's DOM showed when it was taken."""

    path: Path
    captions: list[str]
    image_widths: list[int]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, out: Path, expected_images: int, browser: str | None = None,
               timeout_s: float = 300) -> Shot:
    """Load `url` in headless Chromium, wait (up to `timeout_s`) until the comparison gallery shows
    `expected_images` generated images, all loaded, and save a PNG of the window."""
    from playwright.sync_api import sync_playwright

    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=browser, headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = chromium.new_page(viewport={"width": WINDOW[0], "height": WINDOW[1]})
            page.goto(url, wait_until="load", timeout=timeout_s * 1000)
            page.wait_for_function(_READY, arg=[GALLERY, expected_images], timeout=timeout_s * 1000,
                                   polling=250)
            rendered = page.evaluate(_RENDERED, GALLERY)
            page.screenshot(path=str(out))
        finally:
            chromium.close()
    return Shot(Path(out), [r["caption"] for r in rendered], [r["width"] for r in rendered])


def main() -> None:
    import benchmarks  # noqa: F401  (registers the model name "toy")
    from apps.app import build_app
    from erasers.run import erase

    browser = find_chromium()
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    import os
    import tempfile

    out = Path(__file__).resolve().parent / "screenshot.png"
    home = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        # Run from inside the temporary folder: the page names its edits folder as given ("runs", as the README's
        # command), not as a temporary path.
        os.chdir(tmp)
        try:
            runs = Path("runs")
            # arrow: the object the toy pipeline draws most reliably (90%), so the base image shows what is erased.
            erase("toy", "uce", ["arrow"], runs / "no-arrow")
            erase("toy", "esd-x", ["Stripes"], runs / "no-stripes")
            app = build_app("toy", runs, Path("app-output"))
            app.launch(server_name="127.0.0.1", server_port=7861, prevent_thread_lock=True, quiet=True)
            try:
                # The page opens generating the base and the two preloaded edits.
                shot = screenshot("http://127.0.0.1:7861/", out, expected_images=3, browser=browser)
            finally:
                app.close()
        finally:
            os.chdir(home)
    print(f"wrote {out}: " + "; ".join(shot.captions))


if __name__ == "__main__":
    main()
