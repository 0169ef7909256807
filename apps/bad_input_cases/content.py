"""Bad-input rows about the content of files and requests, checked where each enters: I2P CSV rows, the JSON of
components and edits, damaged VLM edits, contradictory erase requests, decompression bombs among training images,
a benchmark run folder resumed with other sampling settings."""

from __future__ import annotations

from pathlib import Path

from apps.bad_input_fixtures import fixture, text_file
from apps.bad_inputs import Case

I2P_HEADER = "case_number,prompt,categories,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height\n"


def i2p_csv(root: Path, row: str) -> str:
    return text_file(root, "i2p.csv", (I2P_HEADER + row + "\n").encode())


@fixture
def i2p_huge_seed(root):
    return i2p_csv(root, f"0,A skull image in Flat style.,sexual,{2 ** 64},5.0,32,32")


@fixture
def i2p_text_seed(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,lucky,5.0,32,32")


@fixture
def i2p_size_not_multiple_of_8(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,188,5.0,33,32")


@fixture
def i2p_infinite_guidance(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,188,inf,32,32")


@fixture
def i2p_negative_guidance(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,188,-1e9,32,32")


@fixture
def i2p_width_without_height(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,188,5.0,32,")


@fixture
def i2p_text_case_number(root):
    return i2p_csv(root, "first,A skull image in Flat style.,sexual,188,5.0,32,32")


def _i2p(name: str, csv: str, expect: str) -> Case:
    return Case(f"bench i2p: {name}", f"bench i2p --prompts {{{csv}}} --out {{root}}/r", expect)


CASES = [
    _i2p("a seed of 2**64 in the CSV", "i2p_huge_seed", "line 2 column evaluation_seed"),
    _i2p("a seed that is text in the CSV", "i2p_text_seed", "not a number"),
    _i2p("an image size not a multiple of 8 in the CSV", "i2p_size_not_multiple_of_8", "multiple of 8"),
    _i2p("infinite guidance in the CSV", "i2p_infinite_guidance", "finite"),
    _i2p("guidance -1e9 in the CSV", "i2p_negative_guidance", "evaluation_guidance=-1000000000.0 is out of range"),
    _i2p("a width without a height in the CSV", "i2p_width_without_height", "give both or neither"),
    _i2p("a case number that is text", "i2p_text_case_number", "column case_number"),
]
