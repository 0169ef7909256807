"""The VLM part of gpu_check: every VLM eraser's erase and an answer with its edit applied, on tiny random-weight
LLaVA and Qwen2.5-VL models built from configs as the tests build them (nothing is downloaded), in the run's
precision. A row per family x method: seconds for the erase, peak GPU memory, whether the edit's tensors are finite
and whether the edited model answered. CPU runs only fp32 and bf16 (fp16 needs CUDA: those rows are skipped with
the reason).

    python -m benchmarks.gpu_check --families none --vlm-methods all          # the VLMs only
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

# A few steps of each method: enough to run every code path of the erase once.
QUICK_VLM_OPTIONS = {"sauce": {"sae_steps": 4, "batch_size": 64, "features": 4, "concept_images": 4,
                               "neutral_images": 8},
                     "mllmeraser": {"pgd_steps": 1, "forget_samples": 8, "retain_samples": 8},
                     "ga": {"steps": 2}, "graddiff": {"steps": 2}, "kl": {"steps": 2}, "npo": {"steps": 2}}
VLM_FAMILIES = ("llava", "qwen2.5-vl")


def vlm_methods(names: str) -> list[str]:
    """"all" (every registered VLM eraser), "none", or a comma-separated list."""
    from vlm.registry import available_vlm_methods

    if names == "none":
        return []
    return sorted(available_vlm_methods()) if names == "all" else names.split(",")


def skip_reason(device: str, precision: str) -> str | None:
    if precision == "fp16" and not device.startswith("cuda"):
        return "fp16 needs CUDA"
    return None


def vlm_rows(methods: list[str], device: str, precision: str) -> list[dict]:
    """One row per family x method (module docstring); a row that cannot run here says why in `skipped`."""
    if not methods:
        return []
    reason = skip_reason(device, precision)
    if reason:
        return [{"family": family, "method": method, "skipped": reason} for family in VLM_FAMILIES
                for method in methods]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_vlm_erasers import toy_target
    from test_vlm_models import build_llava, build_qwen

    root = Path(tempfile.mkdtemp())
    directories = {"llava": build_llava(root / "llava"), "qwen2.5-vl": build_qwen(root / "qwen")}
    rows = []
    for family, directory in directories.items():
        for method in methods:
            rows.append(vlm_row(family, directory, method, toy_target(), device, precision, root))
            print(rows[-1], file=sys.stderr, flush=True)  # a run cut short keeps what it measured
    return rows


def vlm_row(family: str, directory: Path, method: str, target, device: str, precision: str, root: Path) -> dict:
    from vlm.edits import applied, save_vlm_edit, vlm_edit_metadata
    from vlm.models import ask_many, load_vlm
    from vlm.registry import build_vlm_config, get_vlm_method

    loaded = load_vlm(str(directory), device=device, precision=precision)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    config = build_vlm_config(method, False, QUICK_VLM_OPTIONS.get(method, {}))
    started = time.perf_counter()
    content = get_vlm_method(method).eraser(config).erase(loaded, target)
    seconds = time.perf_counter() - started
    finite = all(bool(torch.isfinite(t).all()) for t in content.tensors.values())
    out = root / f"{family}-{method}"
    try:
        save_vlm_edit(out, content, vlm_edit_metadata(loaded, method, config, target.concept))
    finally:
        if content.adapter is not None:
            content.adapter.unload()
    items = target.forget[:2]
    with applied(loaded, out):
        answers = ask_many(loaded, [item.image for item in items], [item.prompt for item in items], 4)
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
    del loaded, content
    gc.collect()
    return {"family": family, "method": method, "precision": precision, "seconds": seconds, "peak_bytes": peak,
            "finite": finite, "answered": all(isinstance(answer, str) for answer in answers)}


def vlm_table(rows: list[dict]) -> str:
    lines = ["| VLM | method | erase s | peak GiB | finite | answered |", "|---|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['family']} | {row['method']} | skipped: {row['skipped']} | | | |")
            continue
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f}"
        lines.append(f"| {row['family']} | {row['method']} | {row['seconds']:.1f} | {peak} | "
                     f"{'yes' if row['finite'] else 'NO'} | {'yes' if row['answered'] else 'NO'} |")
    return "\n".join(lines)


def failed(rows: list[dict]) -> list[str]:
    return [f"{r['family']}/{r['method']}" for r in rows if "skipped" not in r and not (r["finite"] and r["answered"])]
