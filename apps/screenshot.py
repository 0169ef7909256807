"""A headless-Chromium screenshot of the app: the README's picture, and what the browser test looks at.

    python -m apps.screenshot           # erases two concepts on the toy model, launches the app, writes
                                        # apps/screenshot.png
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

WINDOW = (1100, 1300)


def screenshot(browser: str, url: str, out: Path) -> Path:
    """Load `url` in headless Chromium, give it time to run the app's first generation, save a PNG."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=60000",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=180)
    return out


def main() -> None:
    from apps.app import build_app
    from erasers.run import erase

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        erase("toy", "uce", ["star"], runs / "no-star")
        erase("toy", "esd-x", ["Stripes"], runs / "no-stripes")
        app = build_app("toy", runs, Path(tmp) / "out")
        app.launch(server_name="127.0.0.1", server_port=7861, prevent_thread_lock=True, quiet=True)
        out = Path(__file__).parent / "screenshot.png"
        screenshot(browser, "http://127.0.0.1:7861/", out)
        app.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
