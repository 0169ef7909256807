"""The MLLMU-Bench data layout: reading and writing its parquet splits, and the prompts its questions are asked with.

A row is one profile (one person, one patient, or one ToyCanvas picture):
    ID                   str
    image                {"bytes": PNG bytes, "path": str | None}   (the Test_Set carries `images`, a list of them)
    biography            str
    Classification_Task  {"Image_Textual_Questions": [Q], "Pure_Text_Questions": [Q]},
                         Q = {"Question", "Options": {"A".."D"}, "Correct_Answer": letter}
    Generation_Task      [{"Question", "Ground_Truth", "Type": "Image_Textual" | "Pure_Text"}]
    Mask_Task            [{"Question" with "__" for the blank, "Ground_Truth", "Type"}]
Other columns are allowed and kept. The benchmark's fine-tuning QA (`ft_Data/`, what its vanilla model learned and
its baselines train on) has rows of ID, image and `metadata`: a JSON list of {"Question", "Answer"}. A split is a
directory of parquet files (as on the hub, `forget_5/train-00000-of-00001.parquet`) or one parquet file.

`qa_items` flattens a row into the questions a model is asked, each with its exact prompt and expected answer;
training the toy VLM and evaluating any VLM both go through it, so both see the same prompts. `eval_py_prompt`
rewrites a question into the prompt MLLMU-Bench's own `eval.py` asks it with, and `shot_text` into the few-shot
example that script shows before it (`erasure bench mllmu`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from erasers.errors import UsageError
from erasers.files import save_atomically

LETTERS = ("A", "B", "C", "D")
IMAGE_TEXTUAL, PURE_TEXT = "Image_Textual", "Pure_Text"
PARQUET_NAME = "train-00000-of-00001.parquet"


def multiple_choice_prompt(question: str, options: dict[str, str]) -> str:
    """MLLMU-Bench's multiple-choice prompt: the question, one "X: option" line per option, the instruction."""
    lines = "\n".join(f"{key}: {value}" for key, value in options.items())
    return f"{question}\n{lines}\nJust give ONE letter representing the answer directly."


def cloze_prompt(question: str) -> str:
    return f"Fill in the blank: {question}"


@dataclass(frozen=True)
class QA:
    """One question as asked: `prompt` is the full user text, `answer` the expected reply (a letter for
    multiple choice)."""

    id: str
    row_id: str
    task: str  # "generation", "classification" or "mask"
    type: str  # IMAGE_TEXTUAL or PURE_TEXT
    question: str
    prompt: str
    answer: str
    options: tuple[tuple[str, str], ...] = ()
    image_index: int = 0

    @property
    def needs_image(self) -> bool:
        return self.type == IMAGE_TEXTUAL


def qa_items(row: dict, tasks: tuple[str, ...] = ("generation", "classification", "mask")) -> list[QA]:
    """Every question of a row, in the row's order: generation, then multiple choice, then cloze."""
    try:
        return _qa_items(row, tasks)
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise UsageError(f"row {row.get('ID')!r} of the data is not in the MLLMU-Bench layout ({type(error).__name__}: "
                         f"{error}); fix or re-download the data") from None


def _qa_items(row: dict, tasks: tuple[str, ...]) -> list[QA]:
    row_id = str(row["ID"])
    items: list[QA] = []
    if "generation" in tasks:
        for k, g in enumerate(row.get("Generation_Task") or []):
            items.append(QA(f"{row_id}/gen{k}", row_id, "generation", _type(g), g["Question"], g["Question"],
                            str(g["Ground_Truth"])))
    if "classification" in tasks:
        task = row.get("Classification_Task") or {}
        for kind, key in ((IMAGE_TEXTUAL, "Image_Textual_Questions"), (PURE_TEXT, "Pure_Text_Questions")):
            for k, q in enumerate(task.get(key) or []):
                options = {letter: q["Options"][letter] for letter in sorted(q["Options"])
                           if q["Options"][letter] is not None}
                items.append(QA(f"{row_id}/mc-{kind}{k}", row_id, "classification", kind, q["Question"],
                                multiple_choice_prompt(q["Question"], options), str(q["Correct_Answer"]).strip(),
                                tuple(options.items())))
    if "mask" in tasks:
        for k, m in enumerate(row.get("Mask_Task") or []):
            items.append(QA(f"{row_id}/mask{k}", row_id, "mask", _type(m), m["Question"], cloze_prompt(m["Question"]),
                            str(m["Ground_Truth"])))
    return items


def finetune_items(row: dict) -> list[QA]:
    """The fine-tuning QA of an `ft_Data/` row (its `metadata`), each asked about the row's image."""
    try:
        pairs = row["metadata"]
        pairs = json.loads(pairs) if isinstance(pairs, str) else pairs
        return [QA(f"{row['ID']}/ft{k}", str(row["ID"]), "finetune", IMAGE_TEXTUAL, p["Question"], p["Question"],
                   str(p["Answer"])) for k, p in enumerate(pairs) if p.get("Question") and p.get("Answer")]
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise UsageError(f"row {row.get('ID')!r} of the fine-tuning data is not in the MLLMU-Bench layout "
                         f"({type(error).__name__}: {error}); its metadata must be a JSON list of Question/Answer "
                         "pairs") from None


# MLLMU-Bench's eval.py: generation asks for one sentence ("accurately" only when an image is shown), cloze names
# the blank "[Blank]", multiple choice is `multiple_choice_prompt`; its few-shot examples end in "Correct Answer:".
GENERATION_INSTRUCTION = {
    IMAGE_TEXTUAL: "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH.",
    PURE_TEXT: "Answer the question based on your trained knowledge in one sentence in ENGLISH."}
CLOZE_INSTRUCTION = "Please **ONLY** provide the correct answer that should replace the [Blank]."


def _eval_py_cloze(question: str) -> str:
    return f"{question.replace('__', '[Blank]')}\n{CLOZE_INSTRUCTION}"


def eval_py_prompt(qa: QA) -> QA:
    """The question with the prompt MLLMU-Bench's eval.py asks it with."""
    if qa.task == "generation":
        return replace(qa, prompt=f"{qa.question}\n{GENERATION_INSTRUCTION[qa.type]}")
    if qa.task == "mask":
        return replace(qa, prompt=_eval_py_cloze(qa.question))
    return qa


def shot_text(qa: QA) -> str:
    """The question as one of eval.py's few-shot examples, its answer given (multiple choice and cloze)."""
    if qa.task == "classification":
        options = "\n".join(f"{key}: {value}" for key, value in qa.options)
        return f"Question: {qa.question}\n{options}\nCorrect Answer: {qa.answer}"
    return f"{_eval_py_cloze(qa.question)}\nCorrect Answer: {qa.answer}"


def _type(entry: dict) -> str:
    return PURE_TEXT if str(entry.get("Type", IMAGE_TEXTUAL)).lower().startswith("pure") else IMAGE_TEXTUAL


# ----------------------------------------------------------------------------------------------------------------
# Images and files


def image_cell(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def row_images(row: dict) -> list[Image.Image]:
    """The row's images (one for training splits, a list for MLLMU-Bench's Test_Set) as RGB PIL images."""
    cells = [row["image"]] if row.get("image") is not None else list(row.get("images") or [])
    images = []
    for cell in cells:
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict) and cell.get("path"):
            data = Path(cell["path"]).read_bytes()
        try:
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        except (OSError, ValueError, TypeError, Image.DecompressionBombError) as error:
            raise UsageError(f"an image of row {row.get('ID')!r} cannot be read ({type(error).__name__}); fix or "
                             "re-download the data") from None
    return images


def split_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        raise UsageError(f"{path} holds no parquet files; pass an MLLMU-Bench split directory (e.g. forget_5/) or "
                         "a .parquet file")
    return files


def read_split(path: str | Path, columns: tuple[str, ...] = ("ID", "Classification_Task")) -> list[dict]:
    """The rows of a split (a directory of parquet files or one file) as plain dicts; `columns` (and an image
    column) must be there (`("ID", "metadata")` for the fine-tuning QA)."""
    import pyarrow.parquet as pq

    rows = []
    for file in split_files(path):
        try:
            table = pq.read_table(file)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise UsageError(f"{file} is not a readable parquet file ({str(error).splitlines()[0][:100]}); fix or "
                             "re-download the data") from None
        missing = set(columns) - set(table.column_names)
        if missing or not {"image", "images"} & set(table.column_names):
            lacking = ", ".join(sorted(missing)) or "an image column"
            raise UsageError(f"{file} is not in the MLLMU-Bench layout (it lacks {lacking})")
        rows += table.to_pylist()
    return rows


def _schema(extra: dict, many_images: bool):
    import pyarrow as pa

    question = pa.struct([("Question", pa.string()), ("Options", pa.struct([(k, pa.string()) for k in LETTERS])),
                          ("Correct_Answer", pa.string())])
    open_question = pa.struct([("Question", pa.string()), ("Ground_Truth", pa.string()), ("Type", pa.string())])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("ID", pa.string()), ("images", pa.list_(image)) if many_images else ("image", image),
              ("biography", pa.string()), ("question", pa.string()), ("answer", pa.string()),
              ("Classification_Task", pa.struct([("Image_Textual_Questions", pa.list_(question)),
                                                 ("Pure_Text_Questions", pa.list_(question))])),
              ("Generation_Task", pa.list_(open_question)), ("Mask_Task", pa.list_(open_question))]
    return pa.schema(fields + [(name, kind) for name, kind in extra.items()])


def write_split(rows: list[dict], directory: str | Path, extra: dict | None = None) -> Path:
    """Write rows in the layout to `directory/train-00000-of-00001.parquet` (atomically); `extra` maps further
    column names to pyarrow types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    many = bool(rows) and "images" in rows[0]
    table = pa.Table.from_pylist(rows, schema=_schema(extra or {}, many))
    final = directory / PARQUET_NAME
    return save_atomically(final, lambda tmp: pq.write_table(table, tmp))
