"""Bad-input rows about edits on the Hub (erasers/hub.py) that are refused before any request: `erasure push` of a
directory that is no edit, of an edit without a model card or whose card has no results, to a repo id that is
malformed or names a dataset or Space; `--edit datasets/OWNER/NAME`. Each is checked before the token is looked up,
so no row reaches a Hub whatever the machine's login. The rows that need a Hub to answer (no token, a token it
refuses, a repo it says is a dataset, a Hub id that does not exist or is no edit, a missing revision) run against a
stand-in Hub in tests/test_hub.py: this table's runner has no server to point huggingface_hub at."""

from __future__ import annotations

from pathlib import Path

from apps.bad_input_fixtures import GOOD_EDIT, edit_dir, fixture
from apps.bad_inputs import Case


def card(edit: str, results: bool) -> str:
    """`edit` with a model card README.md written by huggingface_hub, with a UA result or (not `results`) none."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    scores = [EvalResult(task_type="text-to-image", dataset_type="toycanvas", dataset_name="ToyCanvas",
                         metric_type="accuracy", metric_name="UA", metric_value=1.0)] if results else None
    ModelCard.from_template(ModelCardData(model_name="edit", eval_results=scores)).save(Path(edit) / "README.md")
    return edit


@fixture
def edit_with_card(root):
    return card(edit_dir(root, GOOD_EDIT), results=True)


@fixture
def edit_card_without_results(root):
    return card(edit_dir(root, GOOD_EDIT), results=False)


@fixture
def edit_card_bad_yaml(root):
    edit = edit_dir(root, GOOD_EDIT)
    (Path(edit) / "README.md").write_text("---\nmodel-index: [1, 2\n---\n# An edit\n")
    return edit


@fixture
def card_without_edit(root):
    (root / "edit").mkdir()
    return card(str(root / "edit"), results=True)


CASES = [
    Case("push: a directory with no erasure.json", "push {card_without_edit} --repo me/no-star",
         "is not an edit (no readable erasure.json)"),
    Case("push: an edit without a model card", "push {edit_ok} --repo me/no-star", "has no model card (README.md)"),
    Case("push: a model card without results", "push {edit_card_without_results} --repo me/no-star",
         "has no results"),
    Case("push: a model card whose YAML does not parse", "push {edit_card_bad_yaml} --repo me/no-star",
         "does not read"),
    Case("push: --repo of a dataset", "push {edit_with_card} --repo datasets/me/no-star",
         "is a dataset repo; an edit goes to a model repo"),
    Case("push: --repo of a Space", "push {edit_with_card} --repo spaces/me/no-star", "is a Space repo"),
    Case("push: --repo with three parts", "push {edit_with_card} --repo me/edits/no-star", "is not a Hub repo id"),
    Case("push: --repo with a space", "push {edit_with_card} --repo 'me/no star'", "is not a Hub repo id"),
    Case("push: --repo with '--'", "push {edit_with_card} --repo me/no--star", "is not a Hub repo id"),
    Case("push: a missing directory", "push {root}/none --repo me/no-star", "does not exist"),
    Case("generate: --edit of a dataset on the Hub", "generate --edit datasets/me/no-star --prompt a "
         "--out {root}/a.png", "would be a dataset repo, not an edit"),
]
