"""Bad-input rows about sequential unlearning, `erasure bench toycanvas | unlearncanvas --sequence FILE`
(benchmarks/sequence.py): a sequence with a concept the benchmark does not know, a concept twice, fewer than 2
concepts, objects and styles together, no --methods, a method whose edit cannot be continued from (spm), and a
rerun whose run folder holds another chain's step under a step's name."""

from __future__ import annotations

from apps.bad_input_fixtures import GOOD_EDIT, edit_dir, fixture, text_file
from apps.bad_inputs import Case


@fixture
def sequence_ok(root):
    return text_file(root, "sequence.txt", b"# objects, in order\narrow\nstar\n")


@fixture
def sequence_unknown(root):
    return text_file(root, "sequence.txt", b"arrow\nunicorn\n")


@fixture
def sequence_twice(root):
    return text_file(root, "sequence.txt", b"arrow\nstar\nArrow\n")


@fixture
def sequence_of_one(root):
    return text_file(root, "sequence.txt", b"# just one\narrow\n")


@fixture
def sequence_comments_only(root):
    return text_file(root, "sequence.txt", b"# nothing yet\n\n")


@fixture
def sequence_mixed_kinds(root):
    return text_file(root, "sequence.txt", b"arrow\nStripes\n")


@fixture
def run_with_other_chain(root):
    """A run folder whose uce-seq2-star holds uce of arrow and star made at once, not the chain arrow then star."""
    run = root / "r"
    (run / "edits").mkdir(parents=True)
    (run / "manifest.jsonl").write_text("")
    edit_dir(run / "edits", {**GOOD_EDIT, "concepts": ["arrow", "star"]}, name="uce-seq2-star")
    return str(run)


CASES = [
    Case("bench toycanvas: a --sequence with an unknown concept", "bench toycanvas --methods uce "
         "--sequence {sequence_unknown} --out {root}/r", "unknown concept 'unicorn'"),
    Case("bench toycanvas: a --sequence naming a concept twice", "bench toycanvas --methods uce "
         "--sequence {sequence_twice} --out {root}/r", "names 'Arrow' twice"),
    Case("bench toycanvas: a --sequence of one concept", "bench toycanvas --methods uce "
         "--sequence {sequence_of_one} --out {root}/r", "a sequence needs at least 2"),
    Case("bench toycanvas: a --sequence of comments only", "bench toycanvas --methods uce "
         "--sequence {sequence_comments_only} --out {root}/r", "has no concepts"),
    Case("bench toycanvas: a --sequence of an object and a style", "bench toycanvas --methods uce "
         "--sequence {sequence_mixed_kinds} --out {root}/r", "a chain erases one kind"),
    Case("bench toycanvas: a directory as --sequence", "bench toycanvas --methods uce --sequence {root} "
         "--out {root}/r", "is a directory, not a file"),
    Case("bench toycanvas: --sequence without --methods", "bench toycanvas --sequence {sequence_ok} "
         "--out {root}/r", "--sequence needs --methods"),
    Case("bench toycanvas: --sequence with spm", "bench toycanvas --methods uce,spm --sequence {sequence_ok} "
         "--out {root}/r", "leave spm out of --methods"),
    Case("bench toycanvas: a --sequence whose step is another edit in the run folder", "bench toycanvas "
         "--methods uce --sequence {sequence_ok} --out {run_with_other_chain}", "not step 2 of uce's --sequence"),
    Case("bench toycanvas: --sequence with --report", "bench toycanvas --sequence {sequence_ok} "
         "--report {run_with_other_chain} --out {root}/m", "leave out --sequence"),
]
