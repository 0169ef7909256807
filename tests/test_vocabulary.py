"""A pipeline's concept vocabulary (erasers/vocabulary.py): the toy pipeline ships the world's as concepts.json, and
any pipeline directory that ships one gets the same prompt sets; a malformed file is one clear error."""

import json
import shutil

import pytest

from benchmarks.toycanvas import PIPELINE_DIR
from benchmarks.toycanvas.world import VOCABULARY
from erasers.errors import UsageError
from erasers.models import load_pipeline
from erasers.prompts import make_request
from erasers.vocabulary import FILE_NAME, read_vocabulary

CANVAS = {"objects": ["Bears", "Cats"], "styles": ["Van_Gogh", "Pop_Art"],
          "caption_template": "A {object} image in {style} style.",
          "supercategories": {"object": "animal", "style": "painting"}}


def test_the_toy_pipeline_ships_the_worlds_vocabulary():
    assert read_vocabulary(PIPELINE_DIR) == VOCABULARY


def test_a_pipeline_with_a_vocabulary_gets_its_prompt_sets(tiny_pipeline_dirs, tmp_path):
    source = tmp_path / "canvas-sd"
    shutil.copytree(tiny_pipeline_dirs["sd"], source)
    (source / FILE_NAME).write_text(json.dumps(CANVAS))
    loaded = load_pipeline(str(source), device="cpu")
    request = make_request(["van_gogh"], loaded.tokenizer, loaded.vocabulary)
    assert request.concepts == ["Van_Gogh"] and request.kind == "style"
    assert request.erase_prompts() == ["Van_Gogh style", "A Bears image in Van Gogh style.",
                                       "A Cats image in Van Gogh style."]
    assert request.retain_prompts() == ["A Bears image in Pop Art style.", "A Cats image in Pop Art style."]
    assert request.neutral_prompts(request.erase_prompts()[1:2]) == ["A Bears image in painting style."]
    with pytest.raises(UsageError, match="does not know the concept 'dog'"):
        make_request(["dog"], loaded.tokenizer, loaded.vocabulary)
    assert load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu").vocabulary is None  # free-text concepts


@pytest.mark.parametrize(("change", "message"), [
    ({"objects": []}, "non-empty list"),
    ({"caption_template": "A {object} image."}, "{style}"),
    ({"unsafe_object": "skull"}, "not one of its objects"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_a_malformed_vocabulary_is_one_clear_error(tmp_path, change, message):
    (tmp_path / FILE_NAME).write_text(json.dumps({**CANVAS, **change}))
    with pytest.raises(UsageError, match=message):
        read_vocabulary(tmp_path)
    (tmp_path / FILE_NAME).write_text(json.dumps({k: v for k, v in CANVAS.items() if k != "styles"}))
    with pytest.raises(UsageError, match="lacks the key 'styles'"):
        read_vocabulary(tmp_path)
