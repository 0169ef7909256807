"""Step time and peak memory of each eraser and each attack against a plain forward+backward of the same
denoiser, measured in one run on this machine: on the toy UNet and on the full-size SD 1.5 and SDXL architectures
with random weights (benchmarks.architectures).

    python -m benchmarks.step_cost                  # toy, sd15 and sdxl, each with the methods and attacks
                                                    # whose registry entries name that model
    python -m benchmarks.step_cost --models toy
    python -m benchmarks.step_cost --models sdxl --methods doco --attacks none   # on a machine with over 24 GiB
    python -m benchmarks.step_cost --models sd15 --methods none --attacks ringabell,quantize

An attack's step is what its registry entry's step says (benchmarks.attacks.AttackStep: an optimisation step, a
genetic generation, or, for quantize, a sampling step of the quantized pipeline, whose ratio is to the unquantized
pipeline's sampling step instead of the plain step); its row attacks the base model (benchmarks.step_timing.
time_attack_steps), the images it draws around its steps made with one sampling step and not timed.

Each measurement runs in its own process, so peak resident memory (VmHWM on Linux) is that measurement's alone.
Prints ratios: method step time / plain forward+backward time, and the same for peak memory. Every method is timed
at batch 1, as the plain step (DoCo's defaults are 8 prompts a step, 4 on the toy: its step costs about that many
times more). The plain step holds the denoiser alone: the prompt is encoded first and the text encoders let go.

SDXL runs at 512 px (64x64 latents) with gradient checkpointing in every row, the plain one included: its fp32
UNet weights and gradients alone are 20.6 GB, so a plain step fits a 24 GiB machine only that way, and 1024 px
would make each step take minutes on a CPU. The ratios, not the seconds, are what carries over to a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

MODELS = ("toy", "sd15", "sdxl")


ATTACK = "attack:"  # the rows of attacks are named so, apart from the methods'


def plan(models: list[str], methods: list[str] | None = None, attacks: list[str] | None = None
         ) -> list[tuple[str, str]]:
    """(model, method) rows, each model's plain step first, then its attacks' rows ("attack:NAME"). By default
    each registered eraser on the models its entry's `step_cost_models` names, the README's table: on SD 1.5
    AdvUnlearn's inner attack does not finish 3 steps in 25 minutes on a 2-core CPU; on SDXL ESD-u and DoCo do not
    fit in 24 GiB; Co-Erasing runs on the toy alone, whose IP-Adapter its image steps need. Each registered attack
    with a step (benchmarks.attacks.AttackStep) likewise on its step's `models`. An empty list: none."""
    from benchmarks.attacks import available_attacks
    from erasers.registry import available_methods

    entries, attack_entries = available_methods(), available_attacks()
    rows = []
    for model in models:
        chosen = methods if methods is not None else \
            [name for name, entry in sorted(entries.items()) if model in entry.step_cost_models]
        chosen_attacks = attacks if attacks is not None else \
            [name for name, entry in sorted(attack_entries.items()) if entry.step and model in entry.step.models]
        rows += [(model, method) for method in ["plain", *chosen, *(ATTACK + name for name in chosen_attacks)]]
    return rows
# Training resolution in pixels and gradient checkpointing per full-size model (None: the native resolution).
SETTINGS = {"sd15": (None, False), "sdxl": (512, True)}


def build_loaded(model: str, saved_in: str | None = None):
    """The toy pipeline (or a pipeline directory: the tests' tiny ones), or a full-size architecture with random
    weights in fp32 on the CPU; `saved_in`: that architecture saved there and loaded back, for an attack that
    loads the model again from its source (quantize)."""
    from erasers.models import load_pipeline
    from erasers.precision import TrainingOptions

    if model not in SETTINGS:
        return load_pipeline(model, device="cpu")
    from benchmarks.architectures import as_loaded, build_architecture

    resolution, checkpointing = SETTINGS[model]
    if saved_in is None:
        loaded = as_loaded(build_architecture(model), model, resolution)
    else:
        build_architecture(model).save_pretrained(saved_in)
        loaded = load_pipeline(saved_in, device="cpu")
        loaded.resolution = resolution
    loaded.training = TrainingOptions("fp32", gradient_checkpointing=checkpointing)
    return loaded


def measure(model: str, method: str, steps: int) -> dict:
    """Seconds per step and peak RSS for `method` ('plain' = forward+backward of the whole denoiser; "attack:NAME"
    = one step of that attack, step_timing.time_attack_steps)."""
    from benchmarks.step_timing import seconds_per_step, short_run_config, time_attack_steps, time_plain_step
    from erasers.files import peak_resident_bytes

    if method.startswith(ATTACK):
        from benchmarks.attacks import get_attack

        name = method.removeprefix(ATTACK)
        with tempfile.TemporaryDirectory(prefix="step-cost-") as saved:
            loaded = build_loaded(model, saved if get_attack(name).step.sampling else None)
            timed = time_attack_steps(loaded, name, steps, "star")
        return {"model": model, "method": method, **timed, "peak_rss_bytes": peak_resident_bytes()}
    loaded = build_loaded(model)
    if method == "plain":
        per_step, _ = time_plain_step(loaded, steps, "star", release_text_encoders=True)
    else:
        from erasers.prompts import make_request
        from erasers.registry import get_method

        config = short_run_config(method, steps, model == "toy")
        eraser = get_method(method).eraser(config)
        request = make_request(["star"], loaded.tokenizer, loaded.vocabulary)
        started = time.perf_counter()
        eraser.erase(loaded, request)
        per_step = seconds_per_step(getattr(eraser, "history", None), time.perf_counter() - started, steps)
    return {"model": model, "method": method, "seconds_per_step": per_step,
            "peak_rss_bytes": peak_resident_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", help="comma-separated, or none (default: each registered eraser on the models "
                        "its entry names)")
    parser.add_argument("--attacks", help="comma-separated, or none (default: each registered attack on the models "
                        "its step names)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], int(args.one[2]))))
        return
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    rows = []
    for model, method in plan(args.models.split(","), _names(args.methods), _names(args.attacks)):
        steps = 20 if model == "toy" else 2
        out = subprocess.run([sys.executable, "-m", "benchmarks.step_cost", "--one", model, method, str(steps)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            why = "killed (out of memory?)" if out.returncode == -9 else f"exit status {out.returncode}"
            print(f"{model} {method}: failed, {why}\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # a long run killed later keeps what it measured
    print("| model | method | s/step | x plain | peak RSS MiB | x plain |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        plain = next(r for r in rows if r["model"] == row["model"] and r["method"] == "plain")
        ratio = row["seconds_per_step"] / row.get("baseline_seconds", plain["seconds_per_step"])
        print(f"| {row['model']} | {row['method']} | {row['seconds_per_step']:.3f} | "
              f"{ratio:.2f}{'*' * ('baseline_seconds' in row)} | {row['peak_rss_bytes'] / 2**20:.0f} | "
              f"{row['peak_rss_bytes'] / plain['peak_rss_bytes']:.2f} |")
    print("\nUCE has no training steps: its row is the whole closed-form edit. *: against the unquantized pipeline's "
          "sampling step, timed in the same process.")


def _names(value: str | None) -> list[str] | None:
    """A comma-separated option: None (the registry's default), [] for "none", or the names."""
    if value is None:
        return None
    return [] if value.strip().lower() == "none" else [name.strip() for name in value.split(",") if name.strip()]


if __name__ == "__main__":
    main()
