"""The human part of an edit's model card (erasers.cards): what was erased from what, how to load the edit, its
cost, and its results with the protocol of each."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from .edits import ADAPTER

# Metrics that are shares, shown as percentages as the commands print them.
PERCENT_METRICS = {"UA", "IRA", "CRA", "ASR", "Pre-ASR", "nudity rate", "Q16 rate", "forget score", "test score",
                   "retain score"}


def card_body(metadata: dict, edit_dir: Path, shown_as: Path, results: list) -> str:
    """The card's text for the edit in `edit_dir`, named by the path `shown_as`."""
    vlm = metadata.get("model_kind") == "vlm"
    sections = [_summary(metadata, shown_as),
                "## Use it\n\n" + (_vlm_use(metadata, shown_as) if vlm else _use(metadata, edit_dir, shown_as)),
                "## Cost\n\n" + _cost(metadata.get("cost") or {}),
                "## Results\n\n" + _results(results, metadata, shown_as, vlm)]
    return "\n\n".join(sections) + "\n"


def _names(values) -> str:
    return ", ".join(str(v) for v in values)


def _summary(metadata: dict, shown_as: Path) -> str:
    method = metadata.get("method") or "an eraser"
    concepts = metadata.get("concepts") or [metadata.get("concept")]
    kind = metadata.get("kind")
    what = f"the {kind} " if kind else ""
    base = metadata.get("base_model")
    family = f" ({metadata['base_family']} family)" if metadata.get("base_family") else ""
    lines = [f"# {shown_as.resolve().name}: {_names(concepts)} erased from {base}", "",
             f"An erasure-suite edit: **{method}** erased {what}"
             f"**{_names(concepts)}** from `{base}`{family}."]
    components = metadata.get("components", metadata.get("files")) or []
    lines.append(f"It holds {_names(f'`{c}/`' if '.' not in c else f'`{c}`' for c in components)} and "
                 "`erasure.json`." if components else
                 "It holds no weights (`erasure.json` alone): it acts while the pipeline samples.")
    if metadata.get("anchors"):
        lines.append(f"Anchors: {_names(metadata['anchors'])}.")
    if metadata.get("preserve"):
        lines.append(f"Preserved: {_names(metadata['preserve'])}.")
    parents = metadata.get("parents") or []
    if parents:
        steps = [f"{p['method']} ({_names(p['concepts'])}, from {p['path']})" for p in parents]
        steps.append(f"{method} ({_names(metadata.get('step_concepts') or concepts)})")
        lines.append(f"A chain, erased in sequence: {' then '.join(steps)}; it carries its ancestors' weights.")
    lines.append("The method's full configuration, the versions and the base model's weight record are in "
                 "`erasure.json` (and the configuration in this card's metadata).")
    return "\n".join(lines[:2]) + "\n" + " ".join(lines[2:])


def _use(metadata: dict, edit_dir: Path, shown_as: Path) -> str:
    base, edit = metadata.get("base_model"), shown_as.as_posix()
    model, path = shlex.quote(str(base)), shlex.quote(edit)
    text = ("```bash\n"
            f"erasure generate --model {model} --edit {path} --prompt \"...\" --out image.png\n"
            f"erasure compare --model {model} --edit {path}    # UA / IRA / CRA, recorded on this card\n"
            "```\n")
    components = [c for c in metadata.get("components") or [] if c != ADAPTER]
    if ADAPTER in (metadata.get("components") or []):
        lora = json.dumps(edit + "/adapter")
        text += (f"\n`adapter/` is a LoRA in diffusers' format (`pipe.load_lora_weights({lora})`); `--edit` scales it "
                 "per prompt as the method does, plain diffusers at full strength.")
    elif not components:
        text += ("\nIt loads through the suite only (`--edit`, or `erasers.edits.apply_edits`), which installs its "
                 "guidance on the pipeline's call.")
    if components:
        loads = []
        for component in components:
            library, name = _component_class(edit_dir, component)
            loads.append(f"from {library} import {name}\n"
                         f"{component} = {name}.from_pretrained({json.dumps(edit)}, subfolder=\"{component}\")")
        arguments = ", ".join(f"{c}={c}" for c in components)
        where = json.dumps(str(base))
        if base == "toy":  # a name the suite registers, not a hub id
            loads.insert(0, "import benchmarks  # registers \"toy\", the ToyCanvas pipeline\n"
                            "from erasers.models import resolve_source")
            where = "resolve_source(\"toy\")"
        text += ("\nWith diffusers, the edited components in place of the base model's:\n\n```python\n" +
                 "\n".join(loads) + "\nfrom diffusers import DiffusionPipeline\n"
                 f"pipe = DiffusionPipeline.from_pretrained({where}, {arguments})\n```")
    return text


def _component_class(edit: Path, component: str) -> tuple[str, str]:
    """(library, class) of a saved component, from its config.json (the generic loaders when it does not read)."""
    from .models import saved_class_name

    try:
        config = json.loads((edit / component / "config.json").read_bytes())
        name = saved_class_name(config, edit / component / "config.json")
        return ("diffusers" if "_class_name" in config else "transformers"), name
    except Exception:  # noqa: BLE001 - a card names the generic loader rather than fail
        return ("transformers", "AutoModel") if component.startswith("text_encoder") else ("diffusers", "AutoModel")


def _vlm_use(metadata: dict, shown_as: Path) -> str:
    model, edit = shlex.quote(str(metadata.get("base_model"))), shlex.quote(shown_as.as_posix())
    report = shlex.quote(shown_as.as_posix() + "/bench")
    return ("```bash\n"
            f"erasure vlm ask --model {model} --edit {edit} --image image.png --question \"What is in this image?\"\n"
            f"erasure bench mllmu-med --model {model} --edit {edit} --out {report}   # recorded on this card\n"
            "```\n\nIn Python, `with vlm.edits.applied(loaded, path):` answers with the edit applied.")


def _cost(cost: dict) -> str:
    def mib(value) -> str:
        return "-" if value is None else f"{value / 2 ** 20:.2f} MiB"

    return ("| time | peak memory | storage | runs |\n|---|---|---|---|\n"
            f"| {cost.get('seconds', '-')} s | {mib(cost.get('peak_memory_bytes'))} | "
            f"{mib(cost.get('storage_bytes'))} | {cost.get('runs', 1)} |")


def format_value(name: str, value) -> str:
    """A figure as the commands print it: shares as percentages to one decimal, others to four digits."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    share = name in PERCENT_METRICS or bool({"ASR", "Pre-ASR", "rate"} & set(name.split()))  # "ASR int4", ...
    return f"{value:.1%}" if share else f"{value:.4g}"


def _results(results: list, metadata: dict, shown_as: Path, vlm: bool) -> str:
    if not results:
        model, edit = shlex.quote(str(metadata.get("base_model"))), shlex.quote(shown_as.as_posix())
        command = (f"erasure bench mllmu-med --model {model} --edit {edit} --out DIR" if vlm else
                   f"erasure compare --model {model} --edit {edit}")
        return f"None yet: `{command}` scores it and records its figures here."
    groups: dict[str, list] = {}
    for result in results:
        groups.setdefault(result.source_name or result.dataset_name, []).append(result)
    parts = []
    for source, members in groups.items():
        first = members[0]
        settings = dict(first.dataset_args or {})
        stacked = settings.pop("stacked_with", None)
        lines = [f"### {source}", ""]
        if stacked:
            lines += [f"Scored stacked with {_names(stacked)}: the figures are the stack's.", ""]
        lines += ["| metric | value | base model |", "|---|---|---|"]
        for result in members:
            base = (result.metric_args or {}).get("base_model")
            lines.append(f"| {result.metric_name or result.metric_type} | "
                         f"{format_value(result.metric_name, result.metric_value)} | "
                         f"{'-' if base is None else format_value(result.metric_name, base)} |")
        protocol = [f"{first.dataset_name}"] + [f"{key.replace('_', ' ')} {_setting(value)}"
                                                 for key, value in settings.items()]
        if first.metric_config:
            protocol.append(f"judge {first.metric_config}")
        protocol.append(f"figures in `{first.source_url}`")
        lines += ["", "Protocol: " + "; ".join(protocol) + "."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _setting(value) -> str:
    if isinstance(value, list):
        return ", ".join(_setting(v) for v in value)
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_setting(v)}" for k, v in value.items()) + ")"
    return str(value)
