"""Bad-input rows about `erasure vlm robustness` (the attacks' VLM forms): an attack without one, a diffusion edit,
attacks unknown or named twice, options out of range or of an attack not run, bitsandbytes without a CUDA GPU -
each refused before any model loads."""

from __future__ import annotations

from apps.bad_inputs import Case

from .robustness import _has_cuda

VLM_ROBUSTNESS = "vlm robustness --edit {vlm_edit} --out {root}/r"

CASES = [
    Case("vlm robustness: an attack on diffusion edits only", VLM_ROBUSTNESS + " --attacks relearn,ringabell",
         "ringabell attacks diffusion edits, and"),
    Case("vlm robustness: a diffusion edit", "vlm robustness --edit {edit_ok} --attacks quantize --out {root}/r",
         "diffusion-model edit"),
    Case("vlm robustness: an unknown attack", VLM_ROBUSTNESS + " --attacks quantize,nope", "unknown attack 'nope'"),
    Case("vlm robustness: an attack named twice", VLM_ROBUSTNESS + " --attacks quantize,quantize", "twice"),
    Case("vlm robustness: --attacks naming none", VLM_ROBUSTNESS + " --attacks ,", "names no attack"),
    Case("vlm robustness: relearn steps not rising", VLM_ROBUSTNESS + " --attacks relearn --set relearn.steps=10,5",
         "rising step counts"),
    Case("vlm robustness: an option the VLM form lacks", VLM_ROBUSTNESS + " --attacks relearn "
         "--set relearn.image_count=3", "relearn has no option 'image_count'"),
    Case("vlm robustness: --set for an attack not run", VLM_ROBUSTNESS + " --attacks relearn "
         "--set quantize.levels=int8", "not among the attacks run"),
    Case("vlm robustness: a quantization level the backend lacks", VLM_ROBUSTNESS + " --attacks quantize "
         "--set quantize.levels=int3", "levels are int8, int4, int2"),
    Case("vlm robustness: quantize with bitsandbytes without a CUDA GPU", VLM_ROBUSTNESS + " --attacks quantize "
         "--set quantize.backend=bitsandbytes", "needs a CUDA GPU", skip=_has_cuda),
    Case("vlm robustness: quantize with bitsandbytes on --device cpu", VLM_ROBUSTNESS + " --attacks quantize "
         "--set quantize.backend=bitsandbytes --device cpu", "runs on a CUDA GPU only"),
]


def vlm_option_cases() -> list[Case]:
    """Every attack's VLM form: each option set out of its range, generated from the registry."""
    import dataclasses

    from apps.bad_inputs import out_of_range
    from benchmarks.attacks import available_attacks

    return [Case(f"vlm robustness: {name}.{field.name}={value}",
                 VLM_ROBUSTNESS + f" --attacks {name} --set {name}.{field.name}={value}", field.name)
            for name, entry in sorted(available_attacks().items()) if entry.vlm is not None
            for field in dataclasses.fields(entry.vlm.attack.config_class) for value in out_of_range(field)]


CASES += vlm_option_cases()
