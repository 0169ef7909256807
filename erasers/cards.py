"""The model card of an edit: `README.md` in the edit directory, in the Hugging Face Hub's model-card format, written
with huggingface_hub's ModelCard, so the directory uploads to the Hub as a model repository that describes itself.

    ---
    library_name: erasure-suite
    base_model: toy                      the base model the edit was made for (erasure.json's base_model)
    tags: [concept-erasure, esd-x, ...]
    method, concepts, concept_kind, anchors, preserve, config, components, versions, cost, parents (chains)
    model-index:                         the figures the edit has been scored with (huggingface_hub EvalResults)
    ---
    what was erased from what, how to load it, its cost, and a table of the results with their protocol

`write_card` writes it from erasure.json (every saved edit gets one: erasers.edits.publish_with_metadata);
`record_results` puts a command's figures on it, replacing that command's earlier ones and keeping the others;
`card_results` reads them back. Each result carries its protocol in the model-index: `source` (the command,
source_name, also the dataset config that keeps its group apart), where its figures were written (source_url), the
settings that produced them (the dataset args: seeds, steps, guidance, image size, ...) and the judge that read the
images (the metric config: classifier, detector and threshold).

A README.md that is not this suite's card (a user's own, or a Hub card made by something else) is never
overwritten: it is left as it is, with one warning line. The card is outside what a chain fingerprints
(erasers.chains.edit_fingerprint: erasure.json and the components), so recording results never changes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .edits import METADATA
from .errors import UsageError
from .files import plain_json, save_atomically

CARD = "README.md"
LIBRARY = "erasure-suite"
# Protocol keys that say where a result belongs rather than how it was produced (see record_results).
_PLACEMENT = ("task", "task_type", "dataset", "dataset_type", "judge", "results", "base")


def card_path(edit_dir: str | Path) -> Path:
    return Path(edit_dir) / CARD


def is_suite_card(path: Path) -> bool:
    """Whether `path` is a model card this suite wrote (its metadata names the library); False for anything else,
    a symbolic link, or a file whose metadata does not read."""
    import yaml
    from huggingface_hub.repocard import metadata_load

    if path.is_symlink() or not path.is_file():
        return False
    try:
        metadata = metadata_load(path)
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(metadata, dict) and metadata.get("library_name") == LIBRARY


def _foreign(path: Path) -> bool:
    """True, after one warning line, when `path` exists and is not this suite's card."""
    if not (path.exists() or path.is_symlink()) or is_suite_card(path):
        return False
    print(f"erasure: warning: {path} is not an erasure-suite model card (a file of your own?); left as it is, "
          "so the edit's card and results are not written there", file=sys.stderr)
    return True


def card_results(edit_dir: str | Path) -> list:
    """The huggingface_hub EvalResults on the edit's card, in the card's order; empty when it has none, no card, or
    a README.md that is not this suite's card."""
    from huggingface_hub import ModelCard

    path = card_path(edit_dir)
    if not is_suite_card(path):
        return []
    return list(ModelCard.load(path, ignore_metadata_errors=True).data.eval_results or [])


def write_card(edit_dir: str | Path, results: list | None = None, shown_as: str | Path | None = None) -> bool:
    """Write the edit's card from its erasure.json, with `results` (EvalResults; None: those already on the card).
    `shown_as` is the path the card's commands name (default `edit_dir`; an edit being saved under a temporary
    name passes its final one). False, with one warning line, when README.md is not this suite's card."""
    path = card_path(edit_dir)
    if _foreign(path):
        return False
    metadata = json.loads((Path(edit_dir) / METADATA).read_bytes())
    if results is None:
        results = card_results(edit_dir)
    card = build_card(metadata, Path(edit_dir), Path(shown_as if shown_as is not None else edit_dir), results)
    save_atomically(path, card.save)
    return True


def record_results(edit_dir: str | Path, source: str, metrics: dict, protocol: dict) -> bool:
    """Put `metrics` ({name: value}; None values left out) on the edit's card as results of `source` (the command
    that produced them: "erasure compare", "erasure attack unlearndiffatk (arrow)", ...), replacing the results of
    the same source and keeping every other's; the card is rewritten atomically.

    `protocol` holds how they were produced, kept in the card's model-index: the settings (seeds, steps,
    guidance, image size, prompts, ... and `stacked_with`, the other edits scored with this one), plus the keys
    `dataset` (its pretty name), `dataset_type`, `task` (its pretty name), `task_type` (the Hub's task id,
    "text-to-image" unless given), `judge` (the classifier or detector,
    with its version and threshold), `results` (the file the figures were written to) and `base` (the base
    model's figures, {name: value}).

    Run after a command has written its own results: any failure to write the card (a README.md of the user's, a
    read-only edit, a damaged erasure.json) is one warning line, never the command's failure. Returns whether
    the card was written."""
    try:
        path = card_path(edit_dir)
        if _foreign(path):
            return False
        new = eval_results(Path(edit_dir), source, metrics, protocol)
        results, placed = [], False
        for result in card_results(edit_dir):  # the source's results keep their place on the card
            if result.source_name != source:
                results.append(result)
            elif not placed:
                results += new
                placed = True
        return write_card(edit_dir, results if placed else results + new)
    except (OSError, ValueError, UsageError) as error:
        print(f"erasure: warning: could not record {source}'s results on {card_path(edit_dir)} "
              f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); the command's own results "
              "stand", file=sys.stderr)
        return False


def eval_results(edit_dir: Path, source: str, metrics: dict, protocol: dict) -> list:
    """`metrics` as huggingface_hub EvalResults carrying `protocol` (see record_results)."""
    from huggingface_hub import EvalResult

    settings = plain_json({k: v for k, v in protocol.items() if k not in _PLACEMENT and v is not None})
    base = plain_json(protocol.get("base") or {})
    dataset = protocol.get("dataset", source)
    results = []
    for name, value in metrics.items():
        if value is None:
            continue
        results.append(EvalResult(
            task_type=protocol.get("task_type", "text-to-image"), task_name=protocol.get("task"),
            dataset_type=protocol.get("dataset_type", _slug(dataset)), dataset_name=dataset,
            dataset_config=source, dataset_args=settings or None,
            metric_type=_slug(name), metric_name=name, metric_value=plain_json(value),
            metric_config=protocol.get("judge"),
            metric_args={"base_model": base[name]} if base.get(name) is not None else None,
            source_name=source, source_url=_where(edit_dir, protocol.get("results"))))
    return results


def _where(edit_dir: Path, results: str | Path | None) -> str:
    """The results file as the card names it: relative to the edit when inside it (the card moves with it)."""
    if results is None:
        return "."
    results = Path(results)
    try:
        return results.resolve().relative_to(edit_dir.resolve()).as_posix()
    except ValueError:
        return str(results.resolve())


def _slug(name: str) -> str:
    return "-".join(str(name).lower().replace("_", " ").split())


def build_card(metadata: dict, edit_dir: Path, shown_as: Path, results: list):
    """The ModelCard of the edit in `edit_dir` (its erasure.json `metadata`), named by the path `shown_as`, with
    `results`."""
    from huggingface_hub import ModelCard, ModelCardData

    from .card_text import card_body

    vlm = metadata.get("model_kind") == "vlm"
    concepts = metadata.get("concepts") or [metadata.get("concept")]
    fields = {"method": metadata.get("method"), "concepts": concepts, "concept_kind": metadata.get("kind"),
              "anchors": metadata.get("anchors") or None, "preserve": metadata.get("preserve") or None,
              "step_concepts": metadata.get("step_concepts"), "config": metadata.get("config"),
              "base_family": metadata.get("base_family"),
              "components": metadata.get("components", metadata.get("files")),
              "versions": {LIBRARY: metadata.get("erasure_suite_version"), "torch": metadata.get("torch_version")},
              "created": metadata.get("created"), "cost": metadata.get("cost"),
              "parents": [{k: p.get(k) for k in ("path", "method", "concepts", "fingerprint")}
                          for p in metadata.get("parents", [])] or None}
    tags = ["concept-erasure", metadata.get("method") or "edit", "vlm" if vlm else "text-to-image"]
    tags += ["erasure-chain"] * bool(metadata.get("parents"))
    data = ModelCardData(library_name=LIBRARY, base_model=metadata.get("base_model"), tags=tags,
                         pipeline_tag="image-text-to-text" if vlm else "text-to-image",
                         model_name=shown_as.resolve().name, eval_results=results or None,
                         **{k: plain_json(v) for k, v in fields.items() if v is not None})
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}",
                                   body=card_body(metadata, edit_dir, shown_as, results))
