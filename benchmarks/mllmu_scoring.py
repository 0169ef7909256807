"""Scoring MLLMU-Bench answers as the benchmark's `eval.py` does, shared by `erasure bench mllmu` and `mllmu-med`.

    multiple choice  1 when the answer's first character, upper-cased, is the correct letter
    cloze            1 when the ground truth, lower-cased, is contained in the lower-cased answer
    generation       ROUGE-L F1 of the answer against the ground truth (the rouge-score package, Porter stemmer)

A set's summary holds each task's mean over all its questions, the same for image+text and text-only questions
apart (as the benchmark reports them), and `score`, the mean of the task means (MLLMU-Med's UES is built on it).
"""

from __future__ import annotations

from functools import cache

from vlm.mllmu import IMAGE_TEXTUAL, PURE_TEXT

TASKS = {"classification": "mc", "mask": "cloze", "generation": "rouge_l"}
QUESTION_TYPES = {IMAGE_TEXTUAL: "image_textual", PURE_TEXT: "pure_text"}


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score_answer(qa, answer: str) -> float:
    """1/0 for multiple choice (first letter) and cloze (containment); ROUGE-L F1 for generation."""
    if qa.task == "classification":
        return float(answer.strip()[:1].upper() == qa.answer.strip().upper())
    if qa.task == "mask":
        return float(qa.answer.lower() in answer.lower())
    return rouge_l(answer, qa.answer)


def _task_means(scored: list[tuple[object, float]]) -> dict:
    result: dict = {"n": len(scored)}
    for task, key in TASKS.items():
        values = [s for qa, s in scored if qa.task == task]
        if values:
            result[key] = round(sum(values) / len(values), 4)
    return result


def summarise(scored: list[tuple[object, float]], by_type: bool = False) -> dict:
    """{"n", "mc", "cloze", "rouge_l", "score"} of (qa, score) pairs, absent tasks left out of the score; with
    `by_type`, also {"image_textual": {...}, "pure_text": {...}}, each task's mean over those questions only."""
    result = _task_means(scored)
    parts = [result[key] for key in TASKS.values() if key in result]
    result["score"] = round(sum(parts) / len(parts), 4) if parts else None
    if by_type:
        for kind, key in QUESTION_TYPES.items():
            result[key] = _task_means([(qa, s) for qa, s in scored if qa.type == kind])
    return result
