"""The prompts an attack starts from, and the items it attacks: `--prompts N`, `--prompt-file FILE` (one prompt a
line) or `--prompts-csv FILE` (the published prompt sets in their own layouts); by default the toy concept's
captions, or the concept itself.

`--prompts-csv` reads, with the first column of each list that the file has:
    the prompt     adv_prompt (MMA-Diffusion's adversarial prompts), prompt (P4D's, UnlearnDiffAtk's,
                   Ring-A-Bell's and I2P's sets), sensitive prompt / sensitive_prompt
    its seed       evaluation_seed (P4D, UnlearnDiffAtk, Ring-A-Bell), sd_seed (I2P)
    its guidance   evaluation_guidance (P4D, UnlearnDiffAtk), sd_guidance_scale (I2P)
    categories     kept with each item
A row without a seed takes --seed (as any prompt does), one without guidance the model's default; values are
checked as `erasure bench i2p` checks them (benchmarks.i2p.I2PRow), each bad one a line naming its CSV line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erasers.errors import UsageError
from erasers.inputs import check_input
from erasers.validation import MAX_SEED

PROMPT_COLUMNS = ("adv_prompt", "prompt", "sensitive prompt", "sensitive_prompt")


@dataclass(frozen=True)
class PromptRow:
    """A prompt to attack, with the sampling its source asks for (None: --seed, the model's guidance)."""

    prompt: str
    seed: int | None = None
    guidance: float | None = None
    categories: str | None = None


@dataclass(frozen=True)
class Item:
    """One attacked item: the `index`-th of the run, its prompt, seed and guidance (None: the model's)."""

    index: int
    prompt: str
    seed: int
    guidance: float | None = None
    categories: str | None = None

    def record(self) -> dict:
        """The item's own fields as its result records them."""
        fields = {"prompt": self.prompt, "seed": self.seed}
        if self.guidance is not None:
            fields["guidance"] = self.guidance
        if self.categories:
            fields["categories"] = self.categories
        return fields


def attack_prompts(prompts: list[str], count: int | None, seed: int) -> list[tuple[str, int]]:
    """`count` (prompt, seed) items: the prompts in turn, the seed rising by one each time the list restarts."""
    count = count or len(prompts)
    return [(prompts[i % len(prompts)], seed + i // len(prompts)) for i in range(count)]


def plan_items(rows: list[PromptRow], count: int | None, seed: int) -> list[Item]:
    """`count` items (default one per row): the rows in turn, each with its own seed or `seed`, plus one per time
    the list restarts."""
    count = count or len(rows)
    items = []
    for index in range(count):
        row, round_ = rows[index % len(rows)], index // len(rows)
        items.append(Item(index, row.prompt, (seed if row.seed is None else row.seed) + round_, row.guidance,
                          row.categories))
    return items


def check_seed_room(rows: list[PromptRow] | None, count: int | None, seed: int) -> None:
    """The seeds the items will take stay within 0..MAX_SEED (the seed rises by one per round over the prompts)."""
    rounds = ((count or 1) - 1) // max(len(rows or ()), 1)
    largest = max([seed] + [row.seed for row in rows or () if row.seed is not None])
    if largest + rounds > MAX_SEED:
        raise UsageError(f"--seed {seed} runs past the largest seed ({MAX_SEED}) over the prompts; pass a smaller one")


def read_prompts_csv(path: str | Path) -> list[PromptRow]:
    """The rows of a published prompt set's CSV (the module's docstring lists the columns read)."""
    import pandas as pd

    from benchmarks.i2p import I2PRow

    file = check_input(path, "--prompts-csv", "pass a CSV with a prompt column")
    try:
        # Every cell as text: numbers are converted and checked row by row (I2PRow), never guessed by pandas.
        table = pd.read_csv(file, dtype=str, keep_default_na=False)
    except Exception as error:  # noqa: BLE001 - pandas raises many kinds for a file that is not a CSV
        raise UsageError(f"--prompts-csv {path} is not a readable CSV ({type(error).__name__}); pass a CSV with a "
                         f"prompt column ({', '.join(PROMPT_COLUMNS)})") from None
    column = next((c for c in PROMPT_COLUMNS if c in table.columns), None)
    if column is None:
        raise UsageError(f"--prompts-csv {path} has no prompt column (one of {', '.join(PROMPT_COLUMNS)}; it has "
                         f"{', '.join(map(str, table.columns))[:200]}); pass a P4D, Ring-A-Bell, MMA-Diffusion, "
                         "UnlearnDiffAtk or I2P prompt CSV")
    rows = []
    for index, row in enumerate(table.to_dict("records")):
        prompt = row[column].strip()
        if not prompt:
            continue  # published sets hold a few empty prompts; they cannot be generated
        # The header is line 1; a row's line number is exact unless a quoted prompt spans lines.
        sampling = I2PRow.read(row, f"--prompts-csv {path} line {index + 2}")
        rows.append(PromptRow(prompt, sampling.seed, sampling.guidance, row.get("categories") or None))
    if not rows:
        raise UsageError(f"--prompts-csv {path} has no prompts in its {column!r} column")
    return rows
