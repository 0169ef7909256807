"""A short GPU check of every eraser on the SD 1.5, SDXL and Flux architectures: a few training steps each, with
random weights built from the published configs (nothing is downloaded). For each method x family it checks that
the losses are finite and the edited parameters moved, and prints seconds per step and peak GPU memory against a
plain forward+backward of the same denoiser (all its parameters trained, batch 1, same precision).

    python -m benchmarks.gpu_check                                  # CUDA: sd15, sdxl, flux; bf16
    python -m benchmarks.gpu_check --families sdxl --methods esd-x,uce --gradient-checkpointing
    python -m benchmarks.gpu_check --tiny                           # CPU: the tiny test pipelines (tests/)
    python -m benchmarks.gpu_check --families none --vlm-methods all  # the VLM erasers only (gpu_check_vlm)

Flux is built with its published widths (FLUX.1-dev: 3072-wide blocks, 4096-wide T5-XXL, guidance embedding) but,
by default, fewer blocks (--flux-depth 4,8 joint/single blocks and 4 T5 blocks): the full 12B transformer alone is
24 GB in bf16 and ESD-u's fp32 master weights, gradients and Adam moments on it would need about 200 GB.
`--flux-depth full` builds all 19 + 38 blocks and T5's 24.
DoCo and Co-Erasing run on every family; Co-Erasing with a random IP-Adapter written for each family's denoiser
in the published layout (ViT-H/14-sized image encoder, 4 image tokens; on Flux XLabs' layout) and a random
refinement CLIP. FMN runs two steps of its text stage too (on in its toy default; the text encoders' eager
attention under the same precision). Then every VLM eraser on tiny LLaVA and Qwen2.5-VL models in the same precision
(benchmarks/gpu_check_vlm.py). Exit status 1 if any method's loss is not finite or nothing it trains moved, or a VLM
edit is not finite or its model did not answer.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import gpu_check_vlm
from benchmarks.architectures import FAMILIES, as_loaded, build_architecture, pipeline_family
from benchmarks.step_timing import (
    seconds_per_step,
    short_run_config,
    synchronize,
    time_guided_sampling,
    time_plain_step,
)
from erasers import inputs
from erasers.precision import autocast


def registered_methods() -> list[str]:
    """Every registered eraser (erasers.registry): what gpu_check runs by default."""
    from erasers.registry import available_methods

    return sorted(available_methods())


def plan(families: list[str], methods: list[str] | None = None) -> list[tuple[str, str]]:
    """(family, method) pairs gpu_check measures: each method on the families its registry entry edits."""
    return [(family, method) for family in families for method in (methods or registered_methods())
            if applies(method, family)]
def load(family: str, args):
    """A LoadedPipeline of `family` on the device in the run's precision (--tiny: the tiny test pipelines)."""
    from erasers.models import load_pipeline
    from erasers.precision import TrainingOptions

    options = TrainingOptions(args.precision, args.gradient_checkpointing, args.optimizer)
    if args.tiny:
        loaded = load_pipeline(str(args.tiny_dirs[family]), device=args.device, dtype=options.dtype)
        loaded.resolution = 16 if family == "flux" else None
    else:
        # Built once per family (random initialisation of billions of weights is slow), then copied per method.
        if family not in args.built:
            args.built.clear()
            args.built[family] = build_architecture(family, args.flux_depth).to(dtype=options.dtype)
        loaded = as_loaded(copy.deepcopy(args.built[family]).to(args.device), family, args.resolution)
    loaded.training = options
    return loaded


def _sums(loaded) -> dict[str, float]:
    modules = {**loaded.text_encoders, loaded.family.denoiser: loaded.denoiser}
    return {f"{component}.{name}": float(p.detach().double().sum())
            for component, module in modules.items() for name, p in module.named_parameters()}


def _reset_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: str) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None


def plain_step(family: str, args) -> dict:
    """Forward+backward of the whole denoiser (every parameter trained, batch 1) under the same precision."""
    loaded = load(family, args)
    per_step, loss = time_plain_step(loaded, args.steps, "a photo of a cat",
                                     before_steps=lambda: _reset_memory(args.device))
    result = {"family": family, "method": "plain", "seconds_per_step": per_step,
              "peak_bytes": _peak_memory(args.device), "finite": bool(torch.isfinite(loss)), "moved": True}
    del loaded
    _reset_memory(args.device)  # the adapter refers back to its pipeline: only a collection frees it
    return result


def method_step(family: str, method: str, args) -> dict:
    """`args.steps` timed steps of `method` (plus one untimed), its losses and whether what it edits moved."""
    from erasers.prompts import make_request
    from erasers.registry import get_method

    loaded = load(family, args)
    if not get_method(method).trains:  # its cost is a sampling step's, against a plain sampling step's
        _reset_memory(args.device)
        timed = time_guided_sampling(loaded, method, max(args.steps, 2), "a photo of a cat")
        return {"family": family, "method": method, **timed, "peak_bytes": _peak_memory(args.device),
                "components": []}
    options = ip_adapter_files(loaded, args) if "ip_adapter" in get_method(method).needs else {}
    config = short_run_config(method, args.steps, False, attack_steps=2, retain_batch=1, text_steps=2, **options)
    eraser = get_method(method).eraser(config)
    # A prompt to keep for the methods built around one (UCE, HiRM, AdvUnlearn); the others read their defaults
    # (MACE's presets refuse --preserve without its weights, as an erase does).
    keep = ["a photo of a dog"] if get_method(method).preserves else []
    request = make_request(["a photo of a cat"], loaded.tokenizer, None, preserve=keep)
    before = _sums(loaded)
    _reset_memory(args.device)
    synchronize(args.device)
    started = time.perf_counter()
    with autocast(loaded):
        components = eraser.erase(loaded, request)
    synchronize(args.device)
    history = getattr(eraser, "history", None)
    per_step = seconds_per_step(history, time.perf_counter() - started, args.steps)
    # Every stage's losses (FMN's and Co-Erasing's text stages keep their own histories).
    histories = [rows for key, rows in vars(eraser).items() if key.endswith("history") and isinstance(rows, list)]
    losses = [v for rows in histories for row in rows for k, v in row.items() if k not in ("step", "seconds")]
    after = _sums(loaded)
    # Each edited component moved, not just one of them (FMN's edit holds the denoiser and the text encoders).
    moved = all(any(after[key] != before[key] for key in before if key.split(".", 1)[0] == name)
                for name in components if name != "adapter")
    adapter = components.get("adapter")
    if adapter is not None:  # an adapter edit (SPM) leaves the weights as loaded: it moved if its up-projections did
        moved = moved and any(bool(w.abs().sum() > 0) for key, w in zip(adapter.keys, adapter.weights)
                              if "lora_B" in key)
    result = {"family": family, "method": method, "seconds_per_step": per_step, "peak_bytes": _peak_memory(args.device),
              "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)), "moved": moved,
              "components": sorted(components)}
    del loaded, eraser, components
    _reset_memory(args.device)
    return result


def ip_adapter_files(loaded, args) -> dict[str, str]:
    """Co-Erasing's options for a random IP-Adapter in the published layout for this family's denoiser and a random
    refinement CLIP (--tiny: the tests' tiny encoder configs), written once per family."""
    from benchmarks.architectures import write_random_ip_adapter

    family = loaded.family.name
    if not hasattr(args, "ip_adapter_options"):
        args.ip_adapter_options = {}
    if family not in args.ip_adapter_options:
        root = Path(tempfile.mkdtemp())
        if args.tiny:
            from tiny_pipelines import random_ip_adapter_options

            args.ip_adapter_options[family] = random_ip_adapter_options(loaded, root)
        else:
            args.ip_adapter_options[family] = write_random_ip_adapter(loaded, root)
    return args.ip_adapter_options[family]


def applies(method: str, family: str) -> bool:
    """Whether `method` edits `family` (its registry entry's `families`: what its erase would refuse)."""
    from erasers.registry import get_method

    return pipeline_family(family) in get_method(method).families


def table(rows: list[dict]) -> str:
    lines = ["| family | method | s/step | x plain | peak GiB | x plain | finite | moved |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        plain = next((r for r in rows if r["family"] == row["family"] and r["method"] == "plain"), None)
        if "plain_seconds_per_step" in row:  # a training-free method: a sampling step against a plain one
            time_ratio = f"{row['seconds_per_step'] / row['plain_seconds_per_step']:.2f} (sampling)"
        else:
            time_ratio = f"{row['seconds_per_step'] / plain['seconds_per_step']:.2f}" if plain else "-"
        peak = row["peak_bytes"]
        peak_text = "-" if peak is None else f"{peak / 2**30:.1f}"
        peak_ratio = f"{peak / plain['peak_bytes']:.2f}" if peak and plain and plain["peak_bytes"] else "-"
        lines.append(f"| {row['family']} | {row['method']} | {row['seconds_per_step']:.3f} | {time_ratio} | "
                     f"{peak_text} | {peak_ratio} | {'yes' if row['finite'] else 'NO'} | "
                     f"{'yes' if row['moved'] else 'NO'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--methods", help="comma-separated (default: every registered eraser)")
    parser.add_argument("--steps", type=inputs.POSITIVE, default=3, help="timed steps per method (one more runs "
                        "untimed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=("adam", "adam8bit"), default="adam")
    parser.add_argument("--resolution", type=inputs.IMAGE_SIDE, help="training resolution in pixels (default: native)")
    parser.add_argument("--flux-depth", default="4,8", help="joint,single Flux blocks, or 'full' (19,38)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random pipelines of tests/ (runs on CPU)")
    parser.add_argument("--vlm-methods", default="all", help="VLM erasers to run on tiny LLaVA and Qwen2.5-VL: "
                        "'all', 'none' or comma-separated")
    args = parser.parse_args(argv)
    args.built = {}
    from erasers.precision import default_precision

    args.precision = args.precision or default_precision(args.device)
    if not args.tiny and not args.device.startswith("cuda") and args.families != "none":
        parser.error("the full architectures need a CUDA GPU; pass --tiny to run the tiny pipelines on CPU")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    families = [] if args.families == "none" else args.families.split(",")
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_pipelines import BUILDERS, build_tokenizer

        root = Path(tempfile.mkdtemp())
        tokenizer_dir = build_tokenizer(root / "tokenizer")
        args.tiny_dirs = {family: BUILDERS[pipeline_family(family)](root / family, tokenizer_dir)
                          for family in families}
    rows = []
    for family in families:
        methods = []
        for method in (args.methods.split(",") if args.methods else registered_methods()):
            if applies(method, family):
                methods.append(method)
            else:
                print(f"{family}/{method}: does not apply (erasers/README.md#families)", file=sys.stderr)
        if not methods:
            continue  # no plain row either: building and timing the denoiser would compare it with nothing
        for method in ["plain", *methods]:
            row = plain_step(family, args) if method == "plain" else method_step(family, method, args)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)  # a run cut short keeps what it measured
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{device}, {args.precision}, {args.steps} steps, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, optimizer {args.optimizer}"
          + ("" if args.tiny or "flux" not in families else f", Flux depth {args.flux_depth}"))
    print(table(rows))
    print("UCE and the plain row: UCE has no training steps, its row is the whole closed-form edit.")
    failed = [f"{r['family']}/{r['method']}" for r in rows if not (r["finite"] and r["moved"])]
    vlm_rows = gpu_check_vlm.vlm_rows(gpu_check_vlm.vlm_methods(args.vlm_methods), args.device, args.precision)
    if vlm_rows:
        print(gpu_check_vlm.vlm_table(vlm_rows))
    failed += gpu_check_vlm.failed(vlm_rows)
    if failed:
        print(f"FAILED (loss not finite, nothing moved, or a VLM edit not finite or unanswered): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
