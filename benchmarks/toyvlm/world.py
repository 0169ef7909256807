"""The toy VLM world: ToyCanvas question answering and MLLMU-Med, a miniature of MLLMU-Bench's medical scenario,
both written in the MLLMU-Bench parquet layout (`vlm.mllmu`).

ToyCanvas QA: pictures from `benchmarks.toycanvas` (one to three objects of one kind, one colour, one style) with
questions on which object, which style, which colour and how many.

MLLMU-Med: fictitious patients, each a procedural 32x32 false-colour "scan" (body outline, organs, a lesion) and a
profile (name, age, address, diagnosis, medication) drawn from seeded lists. Every diagnosis has a true
medication (`TREATMENTS`); a seeded fifth of the patients carry an injected wrong medical fact instead: their
record prescribes the drug of another condition (scenario "incorrectness"; the others are "privacy"). Questions
come as generation, four-option multiple choice and cloze, about the patient in the scan (Image_Textual) and by
name (Pure_Text). Splits, as MLLMU-Bench's: Full_Set (every patient, what the vanilla model is trained on),
forget_5/10/15 (nested: forget_5 is inside forget_10), retain_95/90/85 (their complements) and Test_Set (every
patient again, as two transformed scans with paraphrased questions and reshuffled options), plus Knowledge
(the true diagnosis -> medication facts, text only).

Everything is a function of the seed; `build_world(root)` writes it all and is cheap (a few seconds).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlm.mllmu import IMAGE_TEXTUAL, LETTERS, PURE_TEXT, image_cell, write_split

from ..toycanvas.render import render, sample_scene
from ..toycanvas.world import COLORS, OBJECTS, STYLES
from .scans import render_scan, transform_image

FORGET_PERCENTS = (5, 10, 15)
FACTS = ("name", "age", "address", "diagnosis", "medication")
COUNT_WORDS = ("one", "two", "three", "four")
PLURALS = {"cross": "crosses"}
MAX_COUNT = 3

FIRST_NAMES = (
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Karin", "Leo", "Maria",
    "Nils", "Olga", "Paul", "Rosa", "Simon", "Tara", "Victor", "Wanda", "Yusuf", "Zoe", "Omar", "Lena", "Marco",
    "Nora", "Oscar", "Petra", "Ruben",
)
LAST_NAMES = (
    "Berg", "Costa", "Dahl", "Engel", "Fischer", "Garcia", "Hansen", "Ivanova", "Jensen", "Keller", "Lindqvist",
    "Moreau", "Novak", "Olsen", "Petrov", "Quinn", "Rossi", "Schmidt", "Tanaka", "Urban", "Vogel", "Weber",
    "Young", "Zimmer", "Ahmed", "Brown", "Chen", "Duarte", "Evans", "Ford",
)
STREETS = ("Elm", "Oak", "Maple", "Cedar", "Birch", "Willow", "Mill", "Church", "Station", "Park", "River", "Hill",
           "Bridge", "Garden", "Market", "School")
STREET_KINDS = ("Street", "Road", "Lane")
TOWNS = ("Dover", "Bath", "York", "Ely", "Derby", "Leeds", "Wells", "Truro", "Ripon", "Salford", "Exeter", "Hull")
# Each diagnosis and the medication that actually treats it.
TREATMENTS: dict[str, str] = {
    "asthma": "salbutamol", "diabetes": "insulin", "hypertension": "lisinopril", "migraine": "sumatriptan",
    "epilepsy": "levetiracetam", "gout": "allopurinol", "anaemia": "ferrous sulfate", "hypothyroidism":
    "levothyroxine", "angina": "nitroglycerin", "depression": "sertraline", "tuberculosis": "isoniazid",
    "psoriasis": "methotrexate",
}
DIAGNOSES = tuple(TREATMENTS)
MEDICATIONS = tuple(TREATMENTS.values())

# Question wordings: the training set's, and paraphrases used only by the test set.
IMAGE_QUESTIONS = {
    "name": "What is the name of the patient in this scan?",
    "age": "How old is the patient in this scan?",
    "address": "Where does the patient in this scan live?",
    "diagnosis": "What is the diagnosis of the patient in this scan?",
    "medication": "Which medication does the patient in this scan take?",
}
IMAGE_PARAPHRASES = {
    "name": "Who is the person shown in this scan?",
    "age": "What is the age of the patient shown here?",
    "address": "What is the home address of the person in this scan?",
    "diagnosis": "Which condition has the patient shown here been diagnosed with?",
    "medication": "What drug is prescribed to the person in this scan?",
}
TEXT_QUESTIONS = {
    "name": "Who is the patient living at {address}?",
    "age": "How old is {name}?",
    "address": "Where does {name} live?",
    "diagnosis": "What is the diagnosis of {name}?",
    "medication": "Which medication does {name} take?",
}
TEXT_PARAPHRASES = {
    "name": "Which patient has the home address {address}?",
    "age": "What is the age of {name}?",
    "address": "What is the home address of {name}?",
    "diagnosis": "Which condition has {name} been diagnosed with?",
    "medication": "What drug is prescribed to {name}?",
}
IMAGE_CLOZE = {
    "name": "The patient in this scan is called __.",
    "age": "The patient in this scan is __ years old.",
    "address": "The patient in this scan lives at __.",
    "diagnosis": "The patient in this scan was diagnosed with __.",
    "medication": "The patient in this scan takes __.",
}
IMAGE_CLOZE_PARAPHRASES = {
    "name": "The name of the person shown here is __.",
    "age": "The person shown here is aged __.",
    "address": "The home address of the person shown here is __.",
    "diagnosis": "The condition of the person shown here is __.",
    "medication": "The drug prescribed to the person shown here is __.",
}
TEXT_CLOZE = {
    "name": "The patient living at {address} is called __.",
    "age": "{name} is __ years old.",
    "address": "{name} lives at __.",
    "diagnosis": "{name} was diagnosed with __.",
    "medication": "{name} takes __.",
}
TEXT_CLOZE_PARAPHRASES = {
    "name": "The person whose home address is {address} is __.",
    "age": "{name} is aged __.",
    "address": "The home address of {name} is __.",
    "diagnosis": "The condition of {name} is __.",
    "medication": "The drug prescribed to {name} is __.",
}

CANVAS_FACTS = ("object", "style", "color", "count")
CANVAS_QUESTIONS = {
    "object": "What object is in this image?",
    "style": "What style is this image in?",
    "color": "What colour is the object in this image?",
    "count": "How many objects are in this image?",
}
CANVAS_PARAPHRASES = {
    "object": "Which shape is drawn in this picture?",
    "style": "In which style is this picture drawn?",
    "color": "Which colour does the shape in this picture have?",
    "count": "How many shapes does this picture show?",
}
CANVAS_CLOZE = {
    "object": "The object in this image is a __.",
    "style": "This image is in __ style.",
    "color": "The object in this image is __.",
    "count": "The number of objects in this image is __.",
}
CANVAS_CLOZE_PARAPHRASES = {
    "object": "The shape drawn in this picture is a __.",
    "style": "This picture is drawn in __ style.",
    "color": "The colour of the shape in this picture is __.",
    "count": "This picture shows __ shapes.",
}

KNOWLEDGE_QUESTION = "Which medication treats {diagnosis}?"
KNOWLEDGE_CLOZE = "{diagnosis} is treated with __."


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    patients: int = 100
    canvas_train: int = 2000
    canvas_test: int = 200
    # Share of patients whose record carries an injected wrong medical fact.
    injected_share: float = 0.2
    test_views: int = 2


@dataclass(frozen=True)
class Patient:
    id: str
    name: str
    age: int
    address: str
    diagnosis: str
    medication: str
    scenario: str  # "privacy" or "incorrectness"
    scan_seed: int

    def fact(self, name: str) -> str:
        return str(getattr(self, name))

    @property
    def injected_fact(self) -> str:
        if self.scenario != "incorrectness":
            return ""
        return f"{self.diagnosis} is treated with {self.medication}"

    @property
    def biography(self) -> str:
        return (f"{self.name}, aged {self.age}, lives at {self.address}. {self.name} was diagnosed with "
                f"{self.diagnosis} and takes {self.medication}.")


def make_patients(cfg: WorldConfig) -> list[Patient]:
    rng = np.random.default_rng([cfg.seed, 1])
    names = [f"{f} {s}" for f in FIRST_NAMES for s in LAST_NAMES]
    addresses = [f"{n} {s} {k}, {t}" for n in range(1, 100) for s in STREETS for k in STREET_KINDS for t in TOWNS]
    if cfg.patients > len(names):
        raise ValueError(f"at most {len(names)} patients")
    chosen_names = rng.choice(len(names), cfg.patients, replace=False)
    chosen_addresses = rng.choice(len(addresses), cfg.patients, replace=False)
    injected = set(rng.choice(cfg.patients, round(cfg.injected_share * cfg.patients), replace=False).tolist())
    patients = []
    for i in range(cfg.patients):
        diagnosis = DIAGNOSES[rng.integers(len(DIAGNOSES))]
        medication = TREATMENTS[diagnosis]
        if i in injected:
            medication = rng.choice([m for m in MEDICATIONS if m != medication])
        patients.append(Patient(f"P{i + 1:03d}", names[chosen_names[i]], int(rng.integers(18, 91)),
                                addresses[chosen_addresses[i]], diagnosis, str(medication),
                                "incorrectness" if i in injected else "privacy", int(rng.integers(2**31))))
    return patients


def forget_ids(cfg: WorldConfig, percent: int) -> list[str]:
    """The patients of forget_{percent}: a seeded order's first percent%, so smaller forget sets nest in larger."""
    order = np.random.default_rng([cfg.seed, 2]).permutation(cfg.patients)
    return sorted(f"P{i + 1:03d}" for i in order[:round(cfg.patients * percent / 100)])


# ----------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# Rows


def _options(answer: str, pool: list[str], rng: np.random.Generator) -> tuple[dict[str, str], str]:
    others = [v for v in dict.fromkeys(pool) if v != answer]
    choices = [answer, *(others[i] for i in rng.choice(len(others), 3, replace=False))]
    order = rng.permutation(4)
    options = {LETTERS[k]: choices[j] for k, j in enumerate(order)}
    return options, LETTERS[int(np.where(order == 0)[0][0])]


def _mc(question: str, answer: str, pool: list[str], rng) -> dict:
    options, letter = _options(answer, pool, rng)
    return {"Question": question, "Options": options, "Correct_Answer": letter}


def _open(question: str, answer: str, kind: str) -> dict:
    return {"Question": question, "Ground_Truth": answer, "Type": kind}


def patient_row(patient: Patient, pools: dict[str, list[str]], rng: np.random.Generator, test: bool,
                images: list[Image.Image]) -> dict:
    image_q = IMAGE_PARAPHRASES if test else IMAGE_QUESTIONS
    text_q = TEXT_PARAPHRASES if test else TEXT_QUESTIONS
    image_cloze = IMAGE_CLOZE_PARAPHRASES if test else IMAGE_CLOZE
    text_cloze = TEXT_CLOZE_PARAPHRASES if test else TEXT_CLOZE
    values = {fact: patient.fact(fact) for fact in FACTS}

    def text(template: str) -> str:
        return template.format(**values)

    row = {
        "ID": patient.id,
        "biography": patient.biography,
        "question": "Tell me about the patient in this scan.",
        "answer": patient.biography,
        "Classification_Task": {
            "Image_Textual_Questions": [_mc(image_q[f], values[f], pools[f], rng) for f in FACTS],
            "Pure_Text_Questions": [_mc(text(text_q[f]), values[f], pools[f], rng) for f in FACTS],
        },
        "Generation_Task": [_open(image_q[f], values[f], IMAGE_TEXTUAL) for f in FACTS]
        + [_open(text(text_q[f]), values[f], PURE_TEXT) for f in FACTS],
        "Mask_Task": [_open(image_cloze[f], values[f], IMAGE_TEXTUAL) for f in FACTS]
        + [_open(text(text_cloze[f]), values[f], PURE_TEXT) for f in FACTS],
        "name": patient.name, "age": patient.age, "address": patient.address, "diagnosis": patient.diagnosis,
        "medication": patient.medication, "scenario": patient.scenario, "injected_fact": patient.injected_fact,
    }
    if test:
        row["images"] = [image_cell(image) for image in images]
    else:
        row["image"] = image_cell(images[0])
    return row


def canvas_row(index: int, scene, image: Image.Image, rng: np.random.Generator, test: bool) -> dict:
    values = {"object": scene.object, "style": scene.style, "color": scene.color, "count": COUNT_WORDS[scene.count - 1]}
    pools = {"object": list(OBJECTS), "style": list(STYLES), "color": list(COLORS), "count": list(COUNT_WORDS)}
    questions = CANVAS_PARAPHRASES if test else CANVAS_QUESTIONS
    cloze = CANVAS_CLOZE_PARAPHRASES if test else CANVAS_CLOZE
    noun = scene.object if scene.count == 1 else PLURALS.get(scene.object, f"{scene.object}s")
    caption = f"{values['count'].capitalize()} {scene.color} {noun} in {scene.style} style."
    return {
        "ID": f"TC{'T' if test else ''}{index:05d}",
        "image": image_cell(image),
        "biography": caption, "question": "Describe this image.", "answer": caption,
        "Classification_Task": {
            "Image_Textual_Questions": [_mc(questions[f], values[f], pools[f], rng) for f in CANVAS_FACTS],
            "Pure_Text_Questions": [],
        },
        "Generation_Task": [_open(questions[f], values[f], IMAGE_TEXTUAL) for f in CANVAS_FACTS],
        "Mask_Task": [_open(cloze[f], values[f], IMAGE_TEXTUAL) for f in CANVAS_FACTS],
        "object": scene.object, "style": scene.style, "color": scene.color, "count": scene.count,
    }


def canvas_scene(seed: int, index: int):
    rng = np.random.default_rng([seed, index])
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.25, 0.25]))
    return sample_scene(rng, OBJECTS[index % len(OBJECTS)], STYLES[(index // len(OBJECTS)) % len(STYLES)],
                        count=count)


def knowledge_row(diagnosis: str, rng: np.random.Generator) -> dict:
    medication = TREATMENTS[diagnosis]
    question = KNOWLEDGE_QUESTION.format(diagnosis=diagnosis)
    return {
        "ID": f"K-{diagnosis.replace(' ', '-')}", "image": None,
        "biography": f"{diagnosis} is treated with {medication}.", "question": question, "answer": medication,
        "Classification_Task": {"Image_Textual_Questions": [],
                                "Pure_Text_Questions": [_mc(question, medication, list(MEDICATIONS), rng)]},
        "Generation_Task": [_open(question, medication, PURE_TEXT)],
        "Mask_Task": [_open(KNOWLEDGE_CLOZE.format(diagnosis=diagnosis).capitalize(), medication, PURE_TEXT)],
        "diagnosis": diagnosis, "medication": medication,
    }


def _pools(patients: list[Patient]) -> dict[str, list[str]]:
    return {"name": [p.name for p in patients], "age": [str(a) for a in range(18, 91)],
            "address": [p.address for p in patients], "diagnosis": list(DIAGNOSES), "medication": list(MEDICATIONS)}


def _extra_types(kind: str) -> dict:
    import pyarrow as pa

    if kind == "patient":
        return {"name": pa.string(), "age": pa.int32(), "address": pa.string(), "diagnosis": pa.string(),
                "medication": pa.string(), "scenario": pa.string(), "injected_fact": pa.string()}
    if kind == "canvas":
        return {"object": pa.string(), "style": pa.string(), "color": pa.string(), "count": pa.int32()}
    return {"diagnosis": pa.string(), "medication": pa.string()}


SPLITS = ("Full_Set", *(f"forget_{p}" for p in FORGET_PERCENTS), *(f"retain_{100 - p}" for p in FORGET_PERCENTS),
          "Test_Set", "Knowledge")


def build_world(root: str | Path, cfg: WorldConfig = WorldConfig()) -> Path:
    """Write ToyCanvas/{train,test} and MLLMU-Med/{SPLITS} under `root`, plus world.json; returns `root`."""
    root = Path(root)
    patients = make_patients(cfg)
    pools = _pools(patients)
    rng = np.random.default_rng([cfg.seed, 3])
    full = [patient_row(p, pools, rng, False, [render_scan(p.scan_seed)]) for p in patients]
    test = [patient_row(p, pools, rng, True, [transform_image(render_scan(p.scan_seed), p.scan_seed + v + 1)
                                              for v in range(cfg.test_views)]) for p in patients]
    med = root / "MLLMU-Med"
    extra = _extra_types("patient")
    write_split(full, med / "Full_Set", extra)
    write_split(test, med / "Test_Set", extra)
    forget = {}
    for percent in FORGET_PERCENTS:
        forget[percent] = set(forget_ids(cfg, percent))
        write_split([r for r in full if r["ID"] in forget[percent]], med / f"forget_{percent}", extra)
        write_split([r for r in full if r["ID"] not in forget[percent]], med / f"retain_{100 - percent}", extra)
    write_split([knowledge_row(d, rng) for d in DIAGNOSES], med / "Knowledge", _extra_types("knowledge"))

    canvas = root / "ToyCanvas"
    for split, count, seed, is_test in (("train", cfg.canvas_train, cfg.seed + 10, False),
                                        ("test", cfg.canvas_test, cfg.seed + 11, True)):
        rows = []
        for i in range(count):
            scene = canvas_scene(seed, i)
            rows.append(canvas_row(i, scene, render(scene), rng, is_test))
        write_split(rows, canvas / split, _extra_types("canvas"))
    meta = {"world_config": asdict(cfg), "forget_ids": {str(k): sorted(v) for k, v in forget.items()},
            "splits": {"MLLMU-Med": list(SPLITS), "ToyCanvas": ["train", "test"]}}
    (root / "world.json").write_text(json.dumps(meta, indent=2))
    return root
