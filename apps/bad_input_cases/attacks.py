"""Bad-input rows about `erasure attack --attack NAME` (benchmarks/attacks/): an unknown attack, its options
(`--set`), prompt sources given twice, a --prompts-csv without a prompt column or with a bad seed, and an attack
against an edit it does not apply to (a VLM edit; P4D against a training-free edit), and every registered attack's
options out of their range - each refused before any model loads."""

from __future__ import annotations

import dataclasses

from apps.bad_input_fixtures import GOOD_EDIT, VLM_EDIT, edit_dir, fixture, text_file
from apps.bad_inputs import Case, out_of_range


@fixture
def attack_csv_without_prompts(root):
    return text_file(root, "prompts.csv", b"case_number,evaluation_seed,categories\n0,42,sexual\n")


@fixture
def attack_csv_bad_seed(root):
    return text_file(root, "prompts.csv", b"prompt,evaluation_seed\nA star image in Flat style.,-3\n")


@fixture
def attack_csv_binary(root):
    return text_file(root, "prompts.csv", bytes(range(256)) * 8)


@fixture
def attack_csv_ok(root):
    return text_file(root, "prompts.csv", b"prompt,evaluation_seed\nA star image in Flat style.,42\n")


@fixture
def attack_vlm_edit(root):
    return edit_dir(root, VLM_EDIT, components=())


@fixture
def attack_negprompt_edit(root):
    return edit_dir(root, {**GOOD_EDIT, "method": "negprompt", "components": [], "base_family": "sd"},
                    components=())


CASES = [
    Case("attacks: an unknown --attack", "attack --attack nope --edit {edit_ok} --out {root}/a",
         "unknown attack 'nope'"),
    Case("attacks: --set without '='", "attack --edit {edit_ok} --set iterations --out {root}/a", "KEY=VALUE"),
    Case("attacks: --set an option the attack lacks", "attack --edit {edit_ok} --set generations=3 --out {root}/a",
         "unlearndiffatk has no option 'generations'"),
    Case("attacks: --set a value of the wrong type", "attack --edit {edit_ok} --set iterations=many --out {root}/a",
         "wants a int"),
    Case("attacks: --iterations and --set iterations", "attack --edit {edit_ok} --iterations 3 --set iterations=4 "
         "--out {root}/a", "both give iterations"),
    Case("attacks: --prompt-file and --prompts-csv", "attack --edit {edit_ok} --prompt-file {three_prompts} "
         "--prompts-csv {attack_csv_ok} --out {root}/a", "not both"),
    Case("attacks: --prompts-csv without a prompt column", "attack --edit {edit_ok} --prompts-csv "
         "{attack_csv_without_prompts} --out {root}/a", "no prompt column"),
    Case("attacks: --prompts-csv with a negative seed", "attack --edit {edit_ok} --prompts-csv {attack_csv_bad_seed} "
         "--out {root}/a", "evaluation_seed"),
    Case("attacks: --prompts-csv of binary garbage", "attack --edit {edit_ok} --prompts-csv {attack_csv_binary} "
         "--out {root}/a", "--prompts-csv"),
    Case("attacks: --prompts-csv is a directory", "attack --edit {edit_ok} --prompts-csv {root} --out {root}/a",
         "directory"),
    Case("attacks: a VLM edit", "attack --edit {attack_vlm_edit} --out {root}/a", "is a vlm edit"),
    Case("attacks: p4d against a training-free edit", "attack --attack p4d --edit {attack_negprompt_edit} "
         "--out {root}/a", "p4d does not apply to"),
    Case("attacks: p4d variant x", "attack --attack p4d --edit {edit_ok} --set variant=x --out {root}/a",
         "n (P4D-N) or k (P4D-K)"),
    Case("attacks: ringabell mutation 2", "attack --attack ringabell --edit {edit_ok} --set mutation=2 "
         "--out {root}/a", "at most 1"),
    Case("attacks: ringabell tokens past the context", "attack --attack ringabell --edit {edit_ok} --set tokens=80 "
         "--out {root}/a", "does not fit"),
    Case("attacks: p4d tokens past the context", "attack --attack p4d --edit {edit_ok} --set tokens=80 "
         "--out {root}/a", "does not fit"),
]


def option_cases() -> list[Case]:
    """For every registered attack: each option set out of its range."""
    from benchmarks.attacks import available_attacks

    return [Case(f"attacks: {name} --set {field.name}={value}",
                 f"attack --attack {name} --edit {{edit_ok}} --set {field.name}={value} --out {{root}}/a", field.name)
            for name, entry in sorted(available_attacks().items())
            for field in dataclasses.fields(entry.attack.config_class) for value in out_of_range(field)]


CASES += option_cases()
