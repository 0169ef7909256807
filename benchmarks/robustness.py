"""`erasure robustness --edit DIR --attacks a,b --out REPORT`: several attacks (benchmarks/attacks/) on one edit, and
the same attacks on the base model as a reference, in one report.

    REPORT/robustness.json   the settings and, per row (base, edit), each attack's headline rate
    REPORT/robustness.md     the table: rows base and the edit, a column per attack; each attack's details below
    REPORT/robustness.html   the same
    REPORT/robustness.png    a bar plot of each attack's success on the base model and on the edit
    REPORT/<attack>/edit/    the attack's own results (benchmarks/attacks/results.py's layout) on the edit,
    REPORT/<attack>/base/    and on the base model

A column's figure is the attack's headline rate (`headline`): the ASR (Pre-ASR beside it), the rate after the last
step of an attack that reports a curve (relearn), or the concept's rate after quantization. Resumable: an attack
finished in REPORT is read back, not run again (an interrupted one resumes from its OUT.partial/), and a rerun may
add attacks; a rerun with other settings is refused. Each attack records its figures on the edit's model card, and
the report records its table there (benchmarks/card_results.record_robustness).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from erasers import inputs
from erasers.errors import UsageError
from erasers.files import plain_json, read_json, save_atomically, write_atomically

MANIFEST = "robustness.json"
ROWS = ("base", "edit")


@dataclass
class RobustnessRun:
    """How each attack runs: the base model, the concept (None: the edit's), `count` prompts from `seed` (None:
    the attack's default prompts), each attack's options over its (toy) defaults, the judge (None: the toy's)."""

    model: str = "toy"
    concept: str | None = None
    count: int | None = None
    seed: int = 188
    options: dict[str, dict] = field(default_factory=dict)
    judge: object | None = None
    judge_spec: str | None = None
    device: str | None = None
    allow_other_base: bool = False
    progress: bool = True


def choose_attacks(names: str | None, edit: str | Path | None, metadata: dict | None) -> list[str]:
    """The attacks named (comma-separated; unknown ones refused with the list; each must apply to the edit), or
    with None or "all" every registered attack that applies to it."""
    from benchmarks.attacks import available_attacks, check_applies, check_model_kinds, get_attack

    if names in (None, "all"):
        chosen = []
        for name, entry in sorted(available_attacks().items()):
            try:
                _check_applies(entry, edit, metadata, check_model_kinds, check_applies)
            except UsageError:
                continue
            chosen.append(name)
        return chosen
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    if not chosen:
        raise UsageError(f"--attacks names no attack; pass some of {', '.join(sorted(available_attacks()))}, or all")
    for name in chosen:
        if chosen.count(name) > 1:
            raise UsageError(f"--attacks names {name} twice; name each attack once")
        _check_applies(get_attack(name), edit, metadata, check_model_kinds, check_applies)
    return chosen


def _check_applies(entry, edit, metadata, check_model_kinds, check_applies) -> None:
    if edit is not None:
        check_model_kinds(entry, [edit])
        check_applies(entry, [edit], [metadata])


def attack_options(pairs: list[str] | None, attacks: list[str]) -> dict[str, dict]:
    """`--set ATTACK.KEY=VALUE` pairs as {attack: {key: value}}; an attack not chosen is refused."""
    from erasers.registry import parse_options

    options: dict[str, dict] = {}
    for key, value in parse_options(pairs).items():
        attack, dot, option = key.partition(".")
        if not dot or not option:
            raise UsageError(f"--set {key}={value}: name the attack, ATTACK.KEY=VALUE (for example --set "
                             "ringabell.generations=30)")
        if attack not in attacks:
            raise UsageError(f"--set {key}=...: {attack} is not among the attacks run ({', '.join(attacks)})")
        options.setdefault(attack, {})[option] = value
    return options


def attack_config(run: RobustnessRun, attack: str):
    """The attack's config: its (toy) defaults with the run's options; refused here, before any model loads."""
    from benchmarks.attacks import build_attack_config, get_attack
    from erasers.models import is_toy_model

    config = build_attack_config(attack, is_toy_model(run.model), run.options.get(attack, {}))
    get_attack(attack).attack(config).check_environment(run.device)
    return config


def attack_once(run: RobustnessRun, attack: str, edits: list[str | Path], out: Path) -> dict:
    """The attack's summary on `edits` (none: the base model) in `out`: read back when it finished there with these
    settings, else run (resuming an interrupted run)."""
    from benchmarks.attacks.harness import run_attack

    config = attack_config(run, attack)
    done = out / "attack.json"
    if done.is_file():
        summary = read_json(done, f"delete {out} to run the attack again")
        wanted = {"attack": attack, "model": run.model, "edits": [str(e) for e in edits],
                  "config": plain_json(dataclasses.asdict(config))}
        if any(summary.get(key) != value for key, value in wanted.items()) or \
                (run.count is not None and summary.get("n", len(summary.get("items", []))) != run.count):
            raise UsageError(f"{out} holds a {attack} run with other settings than these; choose a new --out")
        return summary
    return run_attack(attack, run.model, list(edits), run.concept, count=run.count, seed=run.seed, config=config,
                      judge=run.judge, device=run.device, out=out, progress=run.progress,
                      allow_other_base=run.allow_other_base)


def headline(summary: dict) -> dict:
    """An attack's figure for the table: {"rate", "pre" (or None), "measure"}. On a VLM edit the rate is the forget
    set's score (benchmarks/attacks/vlm_harness.py), after the last step of relearning or at the quantization level
    that brings the most back."""
    rate = "forget score" if summary.get("model_kind") == "vlm" else "rate"
    if "curve" in summary:
        last = summary["curve"][-1]
        return {"rate": last["rate"], "pre": summary["curve"][0]["rate"] if len(summary["curve"]) > 1 else None,
                "measure": f"{rate} after {last['steps']} steps"}
    if "rate_quantized" in summary:
        levels = summary["rate_quantized"]
        return {"rate": summary["asr"] if "asr" in summary else max(levels.values()),
                "pre": summary["rate_unquantized"],
                "measure": f"{rate} after quantization ({', '.join(levels)})", "levels": levels}
    return {"rate": summary["asr"], "pre": summary.get("pre_asr"), "measure": "ASR"}


def run_robustness(run: RobustnessRun, edit: str | Path, attacks: str | None, out: str | Path) -> dict:
    """Every chosen attack on the edit and on the base model into `out` (the module's docstring), and the report."""
    from erasers.edits import read_edit
    from erasers.models import is_toy_model

    metadata = read_edit(edit)
    chosen = choose_attacks(attacks, edit, metadata)
    if not chosen:
        raise UsageError(f"no registered attack applies to {edit}; see benchmarks/README.md#attacks")
    unused = sorted(set(run.options) - set(chosen))
    if unused:
        raise UsageError(f"--set {unused[0]}.KEY=...: {unused[0]} does not apply to {edit}, so it does not run; "
                         "drop the option")
    run = dataclasses.replace(run, concept=run.concept or metadata["concepts"][0])
    if run.judge is None and not is_toy_model(run.model):
        raise UsageError("only the toy model has a built-in judge; pass --judge MODULE:FUNCTION")
    for attack in chosen:
        attack_config(run, attack)  # every option checked before the first attack runs
    settings = {"model": run.model, "edit": str(edit), "concept": run.concept, "prompts": run.count,
                "seed": run.seed, "judge": run.judge_spec}
    return fill_report(out, settings, {"method": metadata.get("method")}, chosen, edit,
                       lambda attack, row, target, where: attack_once(run, attack, [target] if target else [], where))


def fill_report(out: str | Path, settings: dict, header: dict, chosen: list[str], edit: str | Path,
                attack_row) -> dict:
    """The report both sides write: each chosen attack run by `attack_row(attack, row, target, folder)` (target the
    edit, or None for the base row) into OUT/ATTACK/ROW, the manifest rewritten after each so an interrupted run
    resumes, then the report files and the figures on the edit's card. A manifest of other settings is refused."""
    from erasers.outputs import claim_output_dir, claimed_output_dir

    out = claim_output_dir(out, MANIFEST, create=False)
    report = read_json(out / MANIFEST, f"delete {out} to start again") if (out / MANIFEST).is_file() else {}
    if report and report.get("settings") != settings:
        raise UsageError(f"--out {out} holds a robustness report made with other settings ({report.get('settings')})"
                         "; choose a new --out")
    report = {**header, "settings": settings, "rows": report.get("rows", {}), "details": {}}
    with claimed_output_dir(out, MANIFEST) as out:
        for attack in chosen:
            (out / attack).mkdir(exist_ok=True)
            for row, target in zip(ROWS, (None, edit)):
                summary = attack_row(attack, row, target, out / attack / row)
                report["rows"].setdefault(row, {})[attack] = headline(summary)
                report["details"].setdefault(row, {})[attack] = details(summary)
                write_atomically(out / MANIFEST, json.dumps(report, indent=2))
        report["attacks"] = chosen
        write_report(report, out)
        write_atomically(out / MANIFEST, json.dumps(report, indent=2))
    from benchmarks.card_results import record_robustness

    record_robustness(report, edit, out)
    return report


def details(summary: dict) -> str:
    """The line under the table for one attack's run: its prompts and what its figure leaves out."""
    vlm = summary.get("model_kind") == "vlm"
    text = f"{summary.get('n', len(summary.get('items', [])))} {'forget questions' if vlm else 'prompts'}"
    if vlm:
        retain = [f"{r['label']} {_pct(r['retain']['score'])}%" for r in summary["items"]]
        text += f"; retain score {', '.join(retain)}"
    if "rate_quantized" in summary:
        levels = ", ".join(f"{level} {_pct(rate)}%" for level, rate in summary["rate_quantized"].items())
        text += f"; {summary['backend']} {levels}, unquantized {_pct(summary['rate_unquantized'])}%"
        kept = summary.get("unrelated") or {}
        if kept:
            levels = ", ".join(f"{level} {_pct(rate)}%" for level, rate in kept["rate_quantized"].items())
            text += f"; unrelated concepts still drawn: unquantized {_pct(kept['rate_unquantized'])}%, {levels}"
    if "curve" in summary:
        text += "; " + ", ".join(f"{p['steps']} steps {_pct(p['rate'])}%" for p in summary["curve"])
    return text


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    attacks = report["attacks"]
    measures = {attack: report["rows"]["edit"][attack]["measure"] for attack in attacks}
    header = ["model", *(f"{attack}: {measures[attack]} %" + (" (before)" if _has_pre(report, attack) else "")
                         for attack in attacks)]
    names = {"base": f"base ({report['settings']['model']})",
             "edit": f"{Path(report['settings']['edit']).name} ({report.get('method') or 'edit'})"}
    body = []
    for row in ROWS:
        cells = [report["rows"][row][attack] for attack in attacks]
        body.append([names[row], *(_pct(c["rate"]) + (f" ({_pct(c['pre'])})" if c["pre"] is not None else "")
                                   for c in cells)])
    return header, body


def _has_pre(report: dict, attack: str) -> bool:
    return any(report["rows"][row][attack]["pre"] is not None for row in ROWS)


def summary_text(report: dict) -> str:
    settings = report["settings"]
    if report.get("model_kind") == "vlm":
        return (f"Attacks on the VLM edit {settings['edit']} and on its base model {settings['model']}: "
                f"{settings['questions']} forget and retain questions of {settings['concept']!r} drawn at seed "
                f"{settings['seed']}, scored as MLLMU-Med scores a set (the mean of multiple-choice accuracy, cloze "
                "accuracy and ROUGE-L); each attack at its defaults (the toy VLM's on it) with the options given. "
                "In brackets: the forget score before the attack.")
    prompts = f"{settings['prompts']} prompts" if settings["prompts"] else "the attacks' default prompts"
    return (f"Attacks on {settings['edit']} and on its base model {settings['model']}: {prompts} of "
            f"{settings['concept']!r} from seed {settings['seed']}, judged by "
            f"{settings['judge'] or 'the ToyCanvas classifier'}; each attack at its defaults (the toy's on the toy) "
            "with the options given. In brackets: the rate before the attack (the plain prompts' Pre-ASR, the "
            "unquantized edit's, a curve's first point).")


def write_report(report: dict, out: Path) -> None:
    """robustness.md, .html and .png (the module's docstring)."""
    import html

    from benchmarks.report import markdown_table

    header, body = table(report)
    notes = [f"- {attack}, {row}: {report['details'][row][attack]}" for attack in report["attacks"] for row in ROWS]
    plot = write_plot(report, out / "robustness.png")
    md = ["# Robustness", "", summary_text(report), "", markdown_table(header, body), "", *notes, "",
          f"![success per attack]({plot.name})", ""]
    write_atomically(out / "robustness.md", "\n".join(md))
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in body)
    items = "".join(f"<li>{html.escape(note[2:])}</li>" for note in notes)
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #999;padding:4px 8px;text-align:right}img{max-width:900px}")
    write_atomically(out / "robustness.html", f"<!doctype html><html><head><meta charset='utf-8'><title>Robustness"
                     f"</title><style>{style}</style></head><body><h1>Robustness</h1><p>"
                     f"{html.escape(summary_text(report))}</p><table><thead><tr>{cells}</tr></thead><tbody>{rows}"
                     f"</tbody></table><ul>{items}</ul><img src='{plot.name}'></body></html>")


def write_plot(report: dict, path: Path) -> Path:
    """Bars of each attack's headline rate, the base model's beside the edit's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = report["attacks"]
    figure, axes = plt.subplots(figsize=(2 + 1.3 * len(attacks), 3.8))
    width = 0.38
    for offset, row in zip((-width / 2, width / 2), ROWS):
        rates = [100 * report["rows"][row][attack]["rate"] for attack in attacks]
        axes.bar([i + offset for i in range(len(attacks))], rates, width, label=row)
    axes.set_xticks(range(len(attacks)), attacks, rotation=20, ha="right")
    axes.set_ylabel("forget score %" if report.get("model_kind") == "vlm" else "success %")
    axes.set_ylim(0, 105)
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    axes.set_title(f"{report['settings']['concept']}: success per attack")
    figure.tight_layout()
    save_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return path


def cmd_robustness(args) -> None:
    from benchmarks.attacks.judges import load_judge
    from benchmarks.report import markdown_table

    chosen = None if args.attacks in (None, "all") else [a.strip() for a in args.attacks.split(",") if a.strip()]
    options = attack_options(args.set, chosen or _all_attacks())
    judge = load_judge(args.judge) if args.judge else None
    run = RobustnessRun(args.model, args.concept, args.prompts, args.seed, options, judge, args.judge, args.device,
                        args.allow_other_base)
    report = run_robustness(run, args.edit, args.attacks, args.out)
    print(markdown_table(*table(report)))
    print(f"wrote {args.out}/robustness.md, {args.out}/robustness.html, {args.out}/robustness.png and each attack's "
          f"results in {args.out}/ATTACK/base and {args.out}/ATTACK/edit")


def _all_attacks() -> list[str]:
    from benchmarks.attacks import available_attacks

    return sorted(available_attacks())


def add_robustness_command(commands) -> None:
    from erasers.commands import add_edit_arguments

    names = ", ".join(_all_attacks())
    parser = commands.add_parser("robustness", help="several attacks on one edit and on its base model: one table, "
                                 "one plot (REPORT/robustness.md, .html, .png)")
    parser.add_argument("--model", default="toy", help="the base model the edit was made from")
    add_edit_arguments(parser, "the edit directory", inputs.EDIT_DIR, required=True, repeat=False)
    parser.add_argument("--attacks", help=f"comma-separated attacks ({names}); default: all that apply to the edit")
    parser.add_argument("--concept", help="the concept to bring back (default: the edit's)")
    parser.add_argument("--prompts", type=inputs.ATTACKED_PROMPTS, help="prompts per attack (default: each attack's "
                        "default; on the toy model the concept's 10 captions)")
    parser.add_argument("--set", action="append", metavar="ATTACK.KEY=VALUE", help="an option of one attack "
                        "(repeatable), e.g. ringabell.generations=30 or quantize.levels=int8")
    parser.add_argument("--judge", metavar="MODULE:FUNCTION", help="function (images, concept) -> list of bools; "
                        "required off the toy model. It imports and runs that module: name only code you trust")
    parser.add_argument("--seed", type=inputs.SEED, default=188, help="seed of the first prompt's images")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", required=True, help="the report's directory (new, or this command's earlier one: "
                        "finished attacks are kept, the rest run)")
    parser.set_defaults(run=cmd_robustness)
