"""`erasure attack --attack NAME` (benchmarks/attacks/: the registry, the shared harness, one file per attack):
options parsed and checked here, the run in benchmarks.attacks.harness.run_attack. Attack options go through
`--set key=value` as a method's do in `erasure erase`; --iterations, --tokens and --images are shortcuts for the
options of those names."""

from __future__ import annotations

from erasers import inputs
from erasers.commands import add_edit_arguments
from erasers.errors import UsageError


def cmd_attack(args) -> None:
    from benchmarks.attacks import get_attack
    from benchmarks.attacks.harness import run_attack
    from benchmarks.attacks.judges import load_judge
    from benchmarks.attacks.prompts import read_prompts_csv
    from benchmarks.attacks.results import summary_lines
    from erasers.commands import read_prompt_file
    from erasers.registry import parse_options

    get_attack(args.attack)  # an unknown name before anything else is read
    if args.prompt_file and args.prompts_csv:
        raise UsageError("pass either --prompt-file or --prompts-csv, not both")
    options = parse_options(args.set)
    for name in ("iterations", "tokens", "images"):
        if getattr(args, name) is not None:
            if name in options:
                raise UsageError(f"--{name} and --set {name}=... both give {name}; pass one of them")
            options[name] = getattr(args, name)
    judge = load_judge(args.judge) if args.judge else None
    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else \
        read_prompts_csv(args.prompts_csv) if args.prompts_csv else None
    summary = run_attack(args.attack, args.model, args.edit, args.concept, prompts=prompts, count=args.prompts,
                         seed=args.seed, config=options, judge=judge, device=args.device, out=args.out,
                         resolution=args.resolution, allow_other_base=args.allow_other_base, restart=args.restart)
    for line in summary_lines(summary):
        print(line)
    print(f"wrote {args.out}/attack.json, {args.out}/attack.png and {args.out}/images/")


def add_attack_command(commands) -> None:
    from benchmarks.attacks import DEFAULT_ATTACK, available_attacks

    names = ", ".join(sorted(available_attacks()))
    attack = commands.add_parser("attack", help="adversarial attacks that bring an erased concept back (UnlearnDiffAtk "
                                 f"by default; {names}); prints Pre-ASR and ASR")
    attack.add_argument("--attack", default=DEFAULT_ATTACK, help=f"the attack: {names} (default {DEFAULT_ATTACK}; "
                        "benchmarks/README.md#attacks says what each needs)")
    attack.add_argument("--model", default="toy", help="the base model the edit was made from")
    add_edit_arguments(attack, "edit directory (repeat to stack edits)", inputs.EDIT_DIR, required=True)
    attack.add_argument("--concept", help="the concept to bring back (default: the edit's)")
    attack.add_argument("--prompts", type=inputs.ATTACKED_PROMPTS, help="number of prompts attacked, up to 10,000 "
                        "(default: one per prompt; on the toy model, the concept's 10 captions; more repeat them with "
                        "the next seed)")
    attack.add_argument("--prompt-file", type=inputs.PROMPT_FILE, help="prompts of the concept, one a line "
                        "(default: the toy captions, or the concept itself)")
    attack.add_argument("--prompts-csv", type=inputs.existing_file("prompt CSV", "pass a prompt set's CSV"),
                        help="a published prompt set's CSV (P4D, Ring-A-Bell, MMA-Diffusion, UnlearnDiffAtk, I2P): "
                        "its prompts, with their seeds and guidance when it has them")
    attack.add_argument("--set", action="append", metavar="KEY=VALUE", help="an option of the attack (repeatable; "
                        "see benchmarks/README.md#attacks)")
    attack.add_argument("--iterations", type=inputs.POSITIVE, help="the attack's iterations option (unlearndiffatk: "
                        "default 40, 20 on toy)")
    attack.add_argument("--tokens", type=inputs.POSITIVE, help="the attack's tokens option (unlearndiffatk: "
                        "adversarial prefix tokens, default 5)")
    attack.add_argument("--images", metavar="DIR", type=inputs.existing_dir("--images folder", "pass a folder of the "
                        "concept's images"), help="the attack's images option (inversion, relearn: a folder of the "
                        "concept's images, each captioned by NAME.txt beside it; default: drawn by the base model)")
    attack.add_argument("--judge", metavar="MODULE:FUNCTION", help="function (images, concept) -> list of bools "
                        "saying where the concept is; required off the toy model. It imports and runs that module: "
                        "name only code you trust")
    attack.add_argument("--seed", type=inputs.SEED, default=188, help="seed of the first prompt's images")
    attack.add_argument("--resolution", type=inputs.IMAGE_SIDE, help="image size in pixels, a multiple of 16 "
                        "(default: the model's native one)")
    attack.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    attack.add_argument("--out", required=True, help="new directory for attack.json, attack.png and images/ (an "
                        "interrupted run resumes from OUT.partial/ when run again)")
    attack.add_argument("--restart", action="store_true", help="discard an interrupted run's items in OUT.partial/ "
                        "and start from scratch (default: resume)")
    attack.set_defaults(run=cmd_attack)
