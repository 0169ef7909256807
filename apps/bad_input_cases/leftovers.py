"""Bad-input rows left over from issue 46: a toy build never writes into a --build-dir it did not make (with or
without --restart: benchmarks.commands.prepare_build_dir), and a VLM edit whose record of its base weights names
another model is refused (vlm.edits.check_base, erasers.fingerprint's record)."""

from __future__ import annotations

from pathlib import Path

from apps.bad_input_fixtures import VLM_EDIT, edit_dir, fixture
from apps.bad_inputs import Case


@fixture
def users_build_dir(root):
    (root / "mine" / "data").mkdir(parents=True)
    (root / "mine" / "data" / "train.npz").write_bytes(b"the user's own data")
    return str(root / "mine")


@fixture
def empty_folder(root):
    (root / "empty").mkdir()
    return str(root / "empty")


CASES = [
    Case("leftovers: toy build into a user's --build-dir", "toy build data --build-dir {users_build_dir}",
         "carries no build marker"),
    Case("leftovers: toy build-vlm into a user's --build-dir", "toy build-vlm world --build-dir {users_build_dir}",
         "carries no build marker"),
    Case("leftovers: toy build into an empty folder it did not make", "toy build data --build-dir {empty_folder}",
         "build into a new --build-dir"),
]


def vlm_edit_recording(root, **record) -> str:
    """A SAUCE edit of the toy VLM's star whose erasure.json records the base by `record` alone."""
    metadata = {key: value for key, value in VLM_EDIT.items() if key != "base_fingerprint"}
    path = edit_dir(root, {**metadata, "base_model": "my-llava-fine-tune", **record}, components=())
    (Path(path) / "edit.safetensors").write_bytes(b"")
    return path


@fixture
def vlm_edit_for_other_weights(root):
    from apps.bad_input_cases.content import toy_vlm_base

    record = dict(toy_vlm_base()["base_weights"]["model"])  # the toy VLM's layout, every norm doubled
    record["norms"] = " ".join(f"{2 * float(norm):.4g}" for norm in record["norms"].split())
    return vlm_edit_recording(root, base_weights={"model": record})


@fixture
def vlm_edit_for_other_layers(root):
    return vlm_edit_recording(root, base_weights={"model": {"layout": "0123456789abcdef", "norms": "1.0"}})


@fixture
def vlm_edit_without_base_record(root):
    return vlm_edit_recording(root)


CASES += [
    Case("leftovers: vlm ask: an edit recording other weights of the same layout", "vlm ask --question q --edit "
         "{vlm_edit_for_other_weights}", "made for another base model (my-llava-fine-tune; this model's weights "
         "differ"),
    Case("leftovers: vlm ask: an edit recording another model's layers", "vlm ask --question q --edit "
         "{vlm_edit_for_other_layers}", "this model has other layers"),
    Case("leftovers: bench mllmu-med: an edit recording other weights", "bench mllmu-med --edit "
         "{vlm_edit_for_other_weights} --out {root}/r", "this model's weights differ"),
    Case("leftovers: vlm ask: an edit with no record of its base", "vlm ask --question q --edit "
         "{vlm_edit_without_base_record}", "field 'base_weights' should be a JSON object, not missing"),
]
