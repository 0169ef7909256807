"""Bad-input rows about many concepts and erasure in sequence: a --concepts-file that is empty, not UTF-8, too
large or repeats a --concept (erasers.commands.read_concepts_file, erasers.prompts.check_contradictions); a
--base-edit that is an adapter, made for another base model, of another kind of concept, erasing what --preserve
keeps, or with a damaged record of its parents (erasers.chains)."""

from __future__ import annotations

from apps.bad_input_fixtures import GOOD_EDIT, edit_dir, fixture, text_file
from apps.bad_inputs import Case

# A training-free edit (no weights: it loads onto the toy pipeline by family) of the toy's star.
STAR_GUIDANCE = {**GOOD_EDIT, "method": "negprompt", "components": [], "base_family": "sd"}


@fixture
def concepts_comments_only(root):
    return text_file(root, "concepts.txt", b"# nothing to erase yet\n\n   \n")


@fixture
def concepts_latin1(root):
    return text_file(root, "concepts.txt", "arrow\nCaf\u00e9 style\n".encode("latin-1"))


@fixture
def concepts_with_arrow(root):
    return text_file(root, "concepts.txt", b"# objects\nstar\nArrow\n")


@fixture
def concepts_unknown(root):
    return text_file(root, "concepts.txt", b"star\nunicorn\n")


@fixture
def concepts_too_large(root):
    return text_file(root, "concepts.txt", b"star\n" * (2 * 1024 * 1024 + 1))


@fixture
def base_edit_adapter(root):
    return edit_dir(root, {**GOOD_EDIT, "method": "spm", "components": ["adapter"]}, components=("adapter",))


@fixture
def base_edit_for_sdxl(root):
    return edit_dir(root, {**GOOD_EDIT, "base_model": "path/to/sdxl", "base_family": "sdxl"})


@fixture
def base_edit_for_other_weights(root):
    other_unet = {"unet": {"layout": "0123456789abcdef", "norms": "1.0"}}  # not the toy UNet's layout
    return edit_dir(root, {**GOOD_EDIT, "base_model": "my-fine-tune", "base_family": "sd", "base_weights": other_unet})


@fixture
def base_edit_of_styles(root):
    return edit_dir(root, {**STAR_GUIDANCE, "concepts": ["Stripes"], "kind": "style"}, components=())


@fixture
def base_edit_of_star(root):
    return edit_dir(root, STAR_GUIDANCE, components=())


@fixture
def base_edit_parents_text(root):
    return edit_dir(root, {**STAR_GUIDANCE, "parents": "runs/a"}, components=())


@fixture
def chain_parent_without_path(root):
    parent = {"method": "negprompt", "concepts": ["circle"], "kind": "object", "components": [],
              "fingerprint": "0123456789abcdef"}
    return edit_dir(root, {**STAR_GUIDANCE, "parents": [parent]}, components=())


CASES = [
    Case("erase: neither --concept nor --concepts-file", "erase --method uce --out {root}/e",
         "pass --concept NAME (repeatable) or --concepts-file"),
    Case("erase: a --concepts-file of comments only", "erase --method uce --concepts-file {concepts_comments_only} "
         "--out {root}/e", "has no concepts"),
    Case("erase: a --concepts-file not in UTF-8", "erase --method uce --concepts-file {concepts_latin1} "
         "--out {root}/e", "is not UTF-8 text (line 2)"),
    Case("erase: a --concepts-file over 10 MiB", "erase --method uce --concepts-file {concepts_too_large} "
         "--out {root}/e", "is over 10 MiB"),
    Case("erase: a directory as --concepts-file", "erase --method uce --concepts-file {root} --out {root}/e",
         "is a directory, not a file"),
    Case("erase: a concept both in --concept and in --concepts-file", "erase --method uce --concept arrow "
         "--concepts-file {concepts_with_arrow} --out {root}/e", "given twice"),
    Case("bench toycanvas: an unknown concept in --concepts-file", "bench toycanvas --methods uce "
         "--concepts-file {concepts_unknown} --out {root}/r", "unknown concept 'unicorn'"),
    Case("erase: an spm adapter as --base-edit", "erase --method uce --concept arrow --base-edit {base_edit_adapter} "
         "--out {root}/e", "holds an adapter"),
    Case("erase: a --base-edit made for another family", "erase --method uce --concept arrow "
         "--base-edit {base_edit_for_sdxl} --out {root}/e", "sdxl family; this pipeline is sd"),
    Case("erase: a --base-edit made for another checkpoint", "erase --method uce --concept arrow "
         "--base-edit {base_edit_for_other_weights} --out {root}/e", "made for another base model (my-fine-tune"),
    Case("erase: a --base-edit of styles under an erase of objects", "erase --method uce --concept arrow "
         "--base-edit {base_edit_of_styles} --out {root}/e", "a chain erases one kind"),
    Case("erase: --preserve of a concept the --base-edit erased", "erase --method uce --concept arrow "
         "--preserve star --base-edit {base_edit_of_star} --out {root}/e", "erased by --base-edit"),
    Case("erase: a --base-edit whose parents are not a list", "erase --method uce --concept arrow "
         "--base-edit {base_edit_parents_text} --out {root}/e", "field 'parents' should be a list"),
    Case("generate: a chain edit whose parent record has no path", "generate --edit {chain_parent_without_path} "
         "--prompt a --out {root}/a.png", "field 'path' should be a non-empty string"),
    Case("erase: a file as --base-edit", "erase --method uce --concept arrow --base-edit {concepts_with_arrow} "
         "--out {root}/e", "is a file, not a directory"),
]
