"""Bad-input rows of `erasure bench mllmu` (MLLMU-Bench as published) and of the fine-tuning baselines on its data:
a missing split, a forget split without its retain split, parquet without the layout's columns, shots out of range,
a forget split the release does not have, baselines asked to train where no fine-tuning QA is."""

from __future__ import annotations

from pathlib import Path

from apps.bad_input_fixtures import fixture
from apps.bad_inputs import Case

SPLITS = ("forget_5", "retain_95", "Test_Set", "Retain_Set")


def _row(person: str, many_images: bool = False) -> dict:
    from PIL import Image

    from vlm.mllmu import image_cell

    image = image_cell(Image.new("RGB", (8, 8)))
    question = {"Question": f"Where does {person} live?", "Options": {"A": "Rome", "B": "Oslo", "C": "Lima",
                                                                      "D": "Pisa"}, "Correct_Answer": "A"}
    return {"ID": person, **({"images": [image, image]} if many_images else {"image": image}),
            "Classification_Task": {"Image_Textual_Questions": [], "Pure_Text_Questions": [question]},
            "Generation_Task": [], "Mask_Task": []}


def release(root: Path, splits=SPLITS) -> Path:
    """A two-profile release in the Hub's layout, with only `splits` (no ft_Data)."""
    from vlm.mllmu import write_split

    data = root / "data"
    people = {"forget_5": ["P0"], "retain_95": ["P1"], "Test_Set": ["P0"], "Retain_Set": ["C0"]}
    for split in splits:
        write_split([_row(p, split == "Test_Set") for p in people[split]], data / split)
    return data


@fixture
def mllmu_without_retain_set(root):
    return str(release(root, ("forget_5", "retain_95", "Test_Set")))


@fixture
def mllmu_forget_without_retain(root):
    return str(release(root, ("forget_5", "Test_Set", "Retain_Set")))


@fixture
def mllmu_without_columns(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = release(root)
    pq.write_table(pa.table({"ID": ["P0"], "image": [{"bytes": b"", "path": None}]}),
                   data / "forget_5" / "train-00000-of-00001.parquet")
    return str(data)


@fixture
def mllmu_release(root):
    return str(release(root))


@fixture
def mllmu_ft_without_metadata(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = release(root)
    (data / "ft_Data").mkdir()
    pq.write_table(pa.table({"ID": ["P0"], "image": [{"bytes": b"", "path": None}]}),
                   data / "ft_Data" / "train-00000-of-00001.parquet")
    return str(data)


CASES = [
    Case("bench mllmu: no Retain_Set/", "bench mllmu --concept forget_5 --data {mllmu_without_retain_set}",
         "no Retain_Set/"),
    Case("bench mllmu: forget_5 without retain_95", "bench mllmu --concept forget_5 --data "
         "{mllmu_forget_without_retain}", "no retain_95/"),
    Case("bench mllmu: parquet without the layout's columns", "bench mllmu --concept forget_5 --data "
         "{mllmu_without_columns}", "lacks Classification_Task"),
    Case("bench mllmu: --shots 3", "bench mllmu --concept forget_5 --shots 3 --data {mllmu_release}",
         "shots are 0, 1 or 2"),
    Case("bench mllmu: a forget split the release lacks", "bench mllmu --concept forget_20 --data {mllmu_release}",
         "forget_5, forget_10 and forget_15"),
    Case("bench mllmu: no --data", "bench mllmu --concept forget_5", "--data"),
    Case("vlm erase ga: MLLMU-Bench data without ft_Data/", "vlm erase --method ga --concept forget_5 --data "
         "{mllmu_release} --out {root}/edit", "no ft_Data/"),
    Case("vlm erase npo: ft_Data without metadata", "vlm erase --method npo --concept forget_5 --data "
         "{mllmu_ft_without_metadata} --out {root}/edit", "lacks metadata"),
]
