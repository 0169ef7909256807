"""`erasure vlm robustness --model M --edit DIR --attacks relearn,quantize --out REPORT`: the attacks' VLM forms
(benchmarks/attacks/vlm_*.py) on one VLM edit and on its base model, in the report `erasure robustness` writes
(benchmarks/robustness.py: robustness.json, .md, .html, .png; each attack's results in REPORT/<attack>/base and
REPORT/<attack>/edit). A cell is the forget set's score after the attack (relearning's last step count, the
quantization level that brings the most back), the score before it in brackets; each attack's retain scores are
listed under the table. Resumable as `erasure robustness` is: a finished attack is read back, an interrupted one
resumes from its OUT.partial/, a rerun with other settings is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from erasers.errors import UsageError
from erasers.files import plain_json, read_json

from .robustness import attack_options, fill_report, table


@dataclasses.dataclass
class VLMRobustnessRun:
    model: str = "toy-vlm"
    count: int | None = None
    seed: int = 188
    options: dict[str, dict] = dataclasses.field(default_factory=dict)
    data: str | None = None
    device: str | None = None
    allow_other_base: bool = False
    progress: bool = True


def vlm_attacks() -> list[str]:
    """The registered attacks with a VLM form."""
    from benchmarks.attacks import available_attacks

    return sorted(name for name, entry in available_attacks().items() if entry.vlm is not None)


def choose_vlm_attacks(names: str | None, edit: str | Path) -> list[str]:
    """The attacks named (comma-separated), each refused in one line unless it has a VLM form and `edit` is a VLM
    edit; None or "all": every attack with a VLM form."""
    from benchmarks.attacks import get_attack
    from benchmarks.attacks.vlm_harness import check_vlm_edit

    chosen = vlm_attacks() if names in (None, "all") else [n.strip() for n in names.split(",") if n.strip()]
    if not chosen:
        raise UsageError(f"--attacks names no attack; pass some of {', '.join(vlm_attacks())}, or all")
    for name in chosen:
        if chosen.count(name) > 1:
            raise UsageError(f"--attacks names {name} twice; name each attack once")
        get_attack(name)  # an unknown name, with the list
        check_vlm_edit(name, edit)
    return chosen


def attack_once(run: VLMRobustnessRun, attack: str, edit: str | Path | None, concept: str, out: Path) -> dict:
    """The VLM attack's summary on `edit` (None: the base model) in `out`: read back when it finished there with
    these settings, else run (resuming an interrupted run)."""
    from benchmarks.attacks.vlm_harness import VLMAttackRun, run_vlm_attack, vlm_attack_config

    config = vlm_attack_config(attack, run.model, run.options.get(attack), run.device)
    done = out / "attack.json"
    if done.is_file():
        summary = read_json(done, f"delete {out} to run the attack again")
        wanted = {"attack": attack, "model": run.model, "edits": [str(edit)] if edit else [],
                  "config": plain_json(dataclasses.asdict(config))}
        if any(summary.get(key) != value for key, value in wanted.items()):
            raise UsageError(f"{out} holds a {attack} run with other settings than these; choose a new --out")
        return summary
    return run_vlm_attack(attack, run.model, edit, concept, config, VLMAttackRun(
        run.count, run.seed, run.data, run.device, out, run.progress, run.allow_other_base))


def run_vlm_robustness(run: VLMRobustnessRun, edit: str | Path, attacks: str | None, out: str | Path) -> dict:
    """Every chosen attack on the VLM edit and on the base model into `out`, and the report."""
    from vlm.edits import read_vlm_edit

    chosen = choose_vlm_attacks(attacks, edit)
    metadata = read_vlm_edit(edit)
    unused = sorted(set(run.options) - set(chosen))
    if unused:
        raise UsageError(f"--set {unused[0]}.KEY=...: {unused[0]} is not among the attacks run; drop the option")
    from benchmarks.attacks.vlm_harness import DEFAULT_QUESTIONS, vlm_attack_config

    for attack in chosen:
        vlm_attack_config(attack, run.model, run.options.get(attack), run.device)  # all before the first runs
    settings = {"model": run.model, "edit": str(edit), "concept": metadata["concept"],
                "questions": run.count or DEFAULT_QUESTIONS, "seed": run.seed, "data": run.data}
    return fill_report(out, settings, {"model_kind": "vlm", "method": metadata["method"]}, chosen, edit,
                       lambda attack, row, target, where: attack_once(run, attack, target, metadata["concept"],
                                                                      where))


def cmd_vlm_robustness(args) -> None:
    from benchmarks.report import markdown_table

    chosen = vlm_attacks() if args.attacks in (None, "all") else \
        [a.strip() for a in args.attacks.split(",") if a.strip()]
    run = VLMRobustnessRun(args.model, args.questions, args.seed, attack_options(args.set, chosen), args.data,
                           args.device, args.allow_other_base)
    report = run_vlm_robustness(run, args.edit, args.attacks, args.out)
    print(markdown_table(*table(report)))
    print(f"wrote {args.out}/robustness.md, {args.out}/robustness.html, {args.out}/robustness.png and each attack's "
          f"results in {args.out}/ATTACK/base and {args.out}/ATTACK/edit")


def add_vlm_robustness_command(vlm_commands) -> None:
    """`erasure vlm robustness`, added to the `erasure vlm` subcommands (apps/cli.py composes them)."""
    from erasers import inputs
    from erasers.commands import add_edit_arguments

    names = ", ".join(vlm_attacks())
    parser = vlm_commands.add_parser("robustness", help="attacks on one VLM edit and on its base model: one table, "
                                     "one plot (REPORT/robustness.md, .html, .png)")
    parser.add_argument("--model", default="toy-vlm", help="the base VLM the edit was made from")
    add_edit_arguments(parser, "edit directory of `erasure vlm erase`", inputs.VLM_EDIT_DIR, required=True,
                       repeat=False)
    parser.add_argument("--attacks", help=f"comma-separated attacks ({names}); default: all of them")
    parser.add_argument("--questions", type=inputs.ATTACKED_PROMPTS, help="forget and retain questions scored per "
                        "attack (default 60 of each)")
    parser.add_argument("--data", type=inputs.MLLMU_DATA_DIR, help="MLLMU-Bench layout directory of a forget_N "
                        "concept (default: the toy world's MLLMU-Med)")
    parser.add_argument("--set", action="append", metavar="ATTACK.KEY=VALUE", help="an option of one attack "
                        "(repeatable), e.g. relearn.steps=0,20,60 or quantize.levels=int8")
    parser.add_argument("--seed", type=inputs.SEED, default=188, help="seed of the questions drawn")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", required=True, help="the report's directory (new, or this command's earlier one: "
                        "finished attacks are kept, the rest run)")
    parser.set_defaults(run=cmd_vlm_robustness)
