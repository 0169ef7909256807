"""Erasure in sequence: an erase that continues from an existing edit (`erasure erase --base-edit DIR`, EraseSpec's
`base_edit`), so that A then B is one edit directory that reproduces the chain.

The parent edit loads onto the base pipeline first (erasers.edits.apply_edits, with its base-model check), the new
method erases on top of it, and the new edit holds the whole chain:

    unet/ ...           the components both touched: the new method's weights, trained from the parent's
    text_encoder/ ...   the parent's components the new method left alone, copied as they were
    erasure.json        concepts: every concept the chain erases (what compare and the benchmarks score);
                        step_concepts: this step's; parents: each ancestor, oldest first, with its path, method,
                        concepts, kind, config, components and a fingerprint of its erasure.json and weights

so `--edit CHAIN` (or from_pretrained on its components) gives A then B, whether or not A is still where it was.

Training-free parents (sld, negprompt) hold no weights: their guidance acts on the pipeline's call while the new
method trains (on the images it draws) and is installed again, from its record in `parents`, whenever the chain
loads. An adapter edit (spm) is refused as a parent: its LoRA, scaled per prompt at generation time, cannot be
merged into the weights the next method trains, and a method trained with it in place would save a denoiser
wrapped in it; erase from the base and stack the two with `--edit`. An spm *step* on a parent is fine: its adapter
trains on the parent's weights and is saved beside them.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .edits import ADAPTER, METADATA, apply_edits, check_metadata_fields, read_edit
from .errors import UsageError
from .models import LoadedPipeline
from .prompts import EraseRequest, _as_text

# What each ancestor's record in erasure.json's `parents` holds (erasers.edits.check_metadata_fields' kinds).
PARENT_FIELDS = {"path": "text", "method": "text", "concepts": "names+", "kind": "text", "components": "names",
                 "fingerprint": "text"}
PARENT_OPTIONAL_FIELDS = {"config": "object"}
# The kinds that a vocabulary's concepts take and that are scored apart (objects and the unsafe object together).
VOCABULARY_KINDS = {"object": "objects", "unsafe": "objects", "style": "styles"}


def edit_fingerprint(path: str | Path, components: list[str]) -> str:
    """A hash of an edit's erasure.json and of every file of its `components`, by path inside the edit: another
    edit at the same path, or the same one changed, has another fingerprint (a file beside them, such as compare's
    output, does not count)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path / METADATA] + sorted(f for name in components for f in (path / name).rglob("*") if f.is_file())
    for file in files:
        content = hashlib.sha256()
        with open(file, "rb") as handle:  # in blocks: an SDXL UNet is 10 GB
            for block in iter(lambda: handle.read(1 << 24), b""):
                content.update(block)
        digest.update(str(file.relative_to(path)).encode() + b"\0" + content.digest())
    return digest.hexdigest()[:16]


def step_concepts(metadata: dict) -> list[str]:
    """The concepts an edit's own step erased (a chain's `concepts` are the whole chain's)."""
    return metadata.get("step_concepts") or metadata["concepts"]


def chain_name(metadata: dict) -> str:
    """How reports name an edit's method: "uce", or for a chain its methods in order, "esd-x then uce"."""
    methods = [record["method"] for record in metadata.get("parents", [])] + [metadata.get("method") or "edit"]
    return " then ".join(methods)


def parent_records(metadata: dict, path: str | Path) -> list[dict]:
    """An edit's `parents` (none for an edit that is no chain), each record checked; a damaged one is one line."""
    records = metadata.get("parents", [])
    metadata_file = Path(path) / METADATA
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise UsageError(f"{metadata_file}: field 'parents' should be a list of JSON objects; the file is corrupt or "
                         "was edited by hand: re-run the erase that made it")
    for record in records:
        check_metadata_fields(metadata_file, record, PARENT_FIELDS, PARENT_OPTIONAL_FIELDS)
    return records


def chain_installers(path: Path, metadata: dict, apply) -> list[tuple]:
    """What apply_edits installs for one edit once the weights are loaded, as (apply, path, metadata): the guidance
    of each training-free ancestor its `parents` record (oldest first), then its own method's (`apply`, or none),
    each told only the concepts of its own step."""
    from .registry import available_methods

    installers = []
    for record in parent_records(metadata, path):
        entry = available_methods().get(record["method"])  # weights of a since-renamed method are carried anyway
        if entry is not None and entry.apply is not None:
            installers.append((entry.apply, Path(record["path"]), record))
    if apply is not None:
        installers.append((apply, Path(path), {**metadata, "concepts": step_concepts(metadata)}))
    return installers


def chain_problems(path: str | Path) -> list[str]:
    """Which ancestors of the chain edit at `path` have moved or changed since it was made (their fingerprints);
    the chain itself still loads, as it carries what it needs."""
    problems = []
    for record in parent_records(read_edit(path), path):
        where = Path(record["path"])
        try:
            found = edit_fingerprint(where, record["components"])
        except OSError:
            problems.append(f"{where} ({record['method']}) is gone or moved")
            continue
        if found != record["fingerprint"]:
            problems.append(f"{where} ({record['method']}) has changed since")
    return problems


class CopiedComponent(nn.Module):
    """A parent's component carried into the new edit file for file (erasers.edits.save_edit saves it); its weights
    were checked finite when the parent loaded."""

    def __init__(self, source: Path):
        super().__init__()
        self.source = Path(source)

    def save_pretrained(self, directory: str | Path) -> None:
        shutil.copytree(self.source, directory)


@dataclass
class BaseEdit:
    """The edit an erase continues from: its directory, its erasure.json, and the records the new edit's `parents`
    will hold (its own parents, then it, fingerprinted when the erase starts)."""

    path: Path
    metadata: dict
    records: list[dict]

    @classmethod
    def read(cls, path: str | Path) -> BaseEdit:
        """Read and check the parent before any model loads: a diffusion edit (read_edit) that holds no adapter."""
        metadata = read_edit(path)
        if ADAPTER in metadata["components"]:
            raise UsageError(f"--base-edit {path} holds an adapter ({metadata.get('method', 'spm')}): its LoRA, scaled "
                             "per prompt, cannot be trained on; erase from the base model and stack the two edits "
                             f"with --edit {path} --edit NEW")
        for problem in chain_problems(path):
            print(f"erasure: note: an ancestor of {path}, {problem}; the chain is continued as {path} records it",
                  file=sys.stderr)
        record = {"path": str(Path(path).resolve()), "method": metadata.get("method") or "edit",
                  "concepts": step_concepts(metadata), "kind": metadata["kind"],
                  "components": metadata["components"], "config": metadata.get("config", {}),
                  "fingerprint": edit_fingerprint(path, metadata["components"])}
        return cls(Path(path), metadata, parent_records(metadata, path) + [record])

    def load_onto(self, loaded: LoadedPipeline, allow_other_base: bool = False) -> None:
        """The parent on the base pipeline (refused if made for another base, unless `allow_other_base`), frozen
        as a freshly loaded pipeline is."""
        apply_edits(loaded, [self.path], allow_other_base)
        loaded.freeze()

    def check_request(self, request: EraseRequest) -> None:
        """A chain erases one kind of a vocabulary's concepts, and keeps (--preserve) none that it erased."""
        kinds = {VOCABULARY_KINDS.get(self.metadata["kind"]), VOCABULARY_KINDS.get(request.kind)}
        if len(kinds) > 1 and None not in kinds:
            raise UsageError(f"--base-edit {self.path} erases {VOCABULARY_KINDS[self.metadata['kind']]} and this "
                             f"erase {VOCABULARY_KINDS[request.kind]}: a chain erases one kind, as UnlearnCanvas "
                             "scores each kind apart; erase them in separate edits (stack them with --edit where "
                             "they edit different components)")
        erased = {_as_text(concept) for concept in self.metadata["concepts"]}
        both = [prompt for prompt in request.preserve if _as_text(prompt) in erased]
        if both:
            raise UsageError(f"{both[0]!r} is erased by --base-edit {self.path} and --preserve'd here; drop one of "
                             "them")

    def link(self, components: dict[str, nn.Module], metadata: dict) -> tuple[dict[str, nn.Module], dict]:
        """The new edit as the chain's next link: the parent's components the new method did not return, carried
        as they are; `concepts` the chain's, `step_concepts` and `parents` added."""
        carried = {name: CopiedComponent(self.path / name) for name in self.metadata["components"]
                   if name not in components}
        concepts: dict[str, str] = {}
        for concept in [*self.metadata["concepts"], *metadata["concepts"]]:
            concepts.setdefault(_as_text(concept), concept)  # erased again here: named once
        linked = {**metadata, "concepts": list(concepts.values()), "step_concepts": metadata["concepts"],
                  "parents": self.records}
        return {**carried, **components}, linked
