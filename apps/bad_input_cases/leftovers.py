"""Bad-input rows left over from issue 46: a toy build never writes into a --build-dir it did not make (with or
without --restart: benchmarks.commands.prepare_build_dir), and a VLM edit whose record of its base weights names
another model is refused (vlm.edits.check_base, erasers.fingerprint's record)."""

from __future__ import annotations

from apps.bad_input_fixtures import fixture
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
