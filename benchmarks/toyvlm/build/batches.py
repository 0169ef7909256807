"""Questions into token batches laid out as LlavaProcessor lays them out: one question a row (Batcher, for answering),
or several questions packed behind one shared prefix (Packer, for training). `prompt_for` asks a multiple-choice
question with its options reshuffled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm.mllmu import LETTERS, QA, multiple_choice_prompt

from .data import IMAGE_TOKEN, answer_text, user_text


@dataclass
class Sample:
    qa: QA
    # (feature group, index) of the image, or None for a text-only question.
    image: tuple[str, int] | None


def prompt_for(sample: Sample, generator: torch.Generator | None, reshuffle: float) -> tuple[Sample, str]:
    qa = sample.qa
    if qa.task != "classification" or generator is None or torch.rand(1, generator=generator).item() >= reshuffle:
        return sample, qa.prompt
    order = torch.randperm(len(qa.options), generator=generator).tolist()
    options = dict(qa.options)
    correct = options[qa.answer]
    shuffled = {LETTERS[k]: qa.options[j][1] for k, j in enumerate(order)}
    letter = next(k for k, v in shuffled.items() if v == correct)
    moved = Sample(QA(qa.id, qa.row_id, qa.task, qa.type, qa.question, "", letter, tuple(shuffled.items())),
                   sample.image)
    return moved, multiple_choice_prompt(qa.question, shuffled)


class Batcher:
    """Turns samples into padded token ids, answer labels and image features, the way the processor would."""

    def __init__(self, tokenizer, features: dict[str, torch.Tensor], image_tokens: int):
        self.tokenizer, self.features, self.image_tokens = tokenizer, features, image_tokens
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def encode(self, prompt: str, with_image: bool) -> list[int]:
        ids = self.tokenizer(user_text(prompt, with_image), add_special_tokens=False).input_ids
        at = ids.index(self.image_id) if with_image else None
        return ids if at is None else ids[:at] + [self.image_id] * self.image_tokens + ids[at + 1:]

    def __call__(self, samples: list[tuple[Sample, str]], with_answers: bool = True):
        """samples: (sample, prompt text). Returns ids, attention mask, labels (answer tokens only) and features."""
        rows, labels = [], []
        for sample, prompt in samples:
            ids = self.encode(prompt, sample.image is not None)
            answer = self.tokenizer(answer_text(sample.qa.answer), add_special_tokens=False).input_ids \
                if with_answers else []
            rows.append(ids + answer)
            labels.append([-100] * len(ids) + answer)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        # Left padding, as for generation: the answer always starts at the same position.
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        label = torch.tensor([[-100] * (width - len(r)) + lab for r, lab in zip(rows, labels)])
        images = [self.features[s.image[0]][s.image[1]] for s, _ in samples if s.image is not None]
        feats = torch.stack(images).float() if images else None
        return ids, mask, label, feats


class Packer:
    """Packs several questions into one row behind a shared prefix, exactly as if each were asked alone: every
    question segment attends to the prefix and to itself only (a block 4D mask), and its positions continue from
    the prefix's. With the image prefix ("USER: <image>x65\n") computed once for four questions, a step costs
    about half the tokens of one row per question."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.tokenizer = batcher.tokenizer
        self.image_prefix = batcher.encode("", True)[:-len(self._ids(" ASSISTANT:"))]
        # An option line is "\n", its letter, ":", its text: how `option_marks` finds them in a prompt's ids.
        self.newline, self.colon = self._ids("\n")[0], self._ids(":")[-1]
        self.letters = {self._ids(f"\n{letter}:")[1]: letter for letter in LETTERS}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def segment(self, prompt: str, answer: str, after_image: bool) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of one question; after an image prefix the "USER: <image>\n" part is omitted."""
        text = f"{prompt} ASSISTANT:" if after_image else user_text(prompt, False)
        return self._ids(text), self._ids(answer_text(answer))

    def __call__(self, rows: list[tuple[tuple[str, int] | None, list[tuple[Sample, str]]]]):
        """rows: (image reference or None, [(sample, prompt)]). Returns ids, 4D mask, position ids, labels, feats."""
        built = []
        for image, questions in rows:
            prefix = self.image_prefix if image is not None else []
            ids, labels, segment, positions = list(prefix), [-100] * len(prefix), [-1] * len(prefix), \
                list(range(len(prefix)))
            for k, (sample, prompt) in enumerate(questions):
                question, answer = self.segment(prompt, sample.qa.answer, image is not None)
                ids += question + answer
                labels += [-100] * len(question) + answer
                segment += [k] * (len(question) + len(answer))
                positions += list(range(len(prefix), len(prefix) + len(question) + len(answer)))
            built.append((ids, labels, segment, positions))
        width = max(len(b[0]) for b in built)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([b[0] + [pad] * (width - len(b[0])) for b in built])
        labels = torch.tensor([b[1] + [-100] * (width - len(b[1])) for b in built])
        segment = torch.tensor([b[2] + [-2] * (width - len(b[2])) for b in built])
        positions = torch.tensor([b[3] + [0] * (width - len(b[3])) for b in built])
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == -1)
        mask = (causal & same)[:, None]
        images = [self.batcher.features[image[0]][image[1]] for image, _ in rows if image is not None]
        feats = torch.stack(images).float() if images else None
        return ids, mask, positions, labels, feats

    def option_marks(self, rows) -> list[tuple[int, int, bool]]:
        """(row, position, whether it is the right answer) of the last token of every option of every multiple-choice
        question in `rows`, at the positions `__call__` lays them out."""
        marks = []
        for r, (image, questions) in enumerate(rows):
            at = len(self.image_prefix) if image is not None else 0
            for sample, prompt in questions:
                question, answer = self.segment(prompt, sample.qa.answer, image is not None)
                if sample.qa.task == "classification":
                    starts = [k for k in range(len(question) - 2) if question[k] == self.newline
                              and question[k + 1] in self.letters and question[k + 2] == self.colon]
                    for k in starts:
                        end = question.index(self.newline, k + 3)
                        marks.append((r, at + end - 1, self.letters[question[k + 1]] == sample.qa.answer))
                at += len(question) + len(answer)
        return marks
