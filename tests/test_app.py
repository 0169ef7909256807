"""The Gradio app, driven through gradio_client against a launched app on localhost, and seen in headless
Chromium."""

import os
import socket

import pytest

from apps.app import build_app
from erasers.run import erase


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    model = os.environ.get("ERASURE_APP_TEST_MODEL", "toy")
    erase(model, "uce", ["star"], root / "runs" / "no-star", device="cpu")
    erase(model, "esd-te", ["Stripes"], root / "runs" / "no-stripes-te", options={"iterations": 2}, device="cpu")
    app = build_app(model, root / "runs", root / "out")
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "root": root}
    app.close()


def test_base_and_edits_side_by_side_with_classifier_readout(app_env):
    from gradio_client import Client

    client = Client(app_env["url"], verbose=False)
    gallery = client.predict("A star image in Flat style.", 3, 5, 5.0, ["no-star", "no-stripes-te"], True,
                             api_name="/generate")
    captions = [item["caption"] for item in gallery]
    assert len(gallery) == 4
    assert captions[0].startswith("base") and "uce erasing star" in captions[1]
    assert captions[3].startswith("stack: no-star + no-stripes-te")
    assert all("classifier:" in c for c in captions)


def test_bad_input_is_a_message_not_a_crash(app_env):
    from gradio_client import Client

    client = Client(app_env["url"], verbose=False)
    cases = ((("", 0, 5, 5.0, [], False), "prompt 1 is empty"),
             (("a star", 0, 100000, 5.0, [], False), "greater than maximum value 1000|steps 100000 is out of range"),
             (("a star", 0, 5, 5.0, ["gone"], False), "not in"))
    for args, message in cases:
        with pytest.raises(Exception, match=message):
            client.predict(*args, api_name="/generate")
    # The app is still serving.
    assert len(client.predict("A circle image in Dots style.", 0, 2, 5.0, [], False, api_name="/generate")) == 1


def test_gallery_mode_grid_and_table(app_env):
    from gradio_client import Client

    client = Client(app_env["url"], verbose=False)
    image, table = client.predict("no-star", 188, api_name="/gallery")
    assert os.path.exists(image) and "| edited |" in table and "UA" in table


def test_app_writes_only_inside_its_output_folder(app_env):
    written = [p for p in app_env["root"].rglob("*") if p.is_file() and not p.is_relative_to(app_env["root"] / "runs")]
    assert written and all(p.is_relative_to(app_env["root"] / "out") for p in written)


def test_page_renders_generated_images_in_headless_chromium(app_env, tmp_path):
    from apps.screenshot import WINDOW, find_chromium, screenshot

    browser = find_chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from PIL import Image

    # The page opens generating the base and the two edits the app preloads; the screenshot waits for them.
    shot = screenshot(app_env["url"], tmp_path / "app.png", expected_images=3, browser=browser)

    # The DOM, not the picture's colours: three generated images loaded in the page, captioned side by side.
    assert len(shot.captions) == 3 and all(width > 0 for width in shot.image_widths), shot
    assert shot.captions[0].startswith("base") and "uce erasing star" in shot.captions[1], shot
    assert "esd-te erasing Stripes" in shot.captions[2], shot
    assert all("classifier:" in caption for caption in shot.captions), shot
    assert Image.open(shot.path).size == WINDOW


def test_damaged_edits_are_left_out_of_the_lists(tmp_path):
    import json

    from apps.app import AppState
    from apps.vlm_tab import vlm_edits

    good = tmp_path / "good"
    (good / "unet").mkdir(parents=True)
    (good / "erasure.json").write_text(json.dumps({"method": "uce", "concepts": ["star"], "kind": "object",
                                                   "components": ["unet"], "config": {}}))
    for name, content in (("binary", bytes(range(256))), ("wrong-types", b'{"components": 5}'), ("list", b"[]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "erasure.json").write_bytes(content)
    state = AppState("toy", tmp_path)
    assert list(state.edits()) == ["good"] and sorted(state.skipped) == ["binary", "list", "wrong-types"]
    assert vlm_edits(tmp_path) == {}
