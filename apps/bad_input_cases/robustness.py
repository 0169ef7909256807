"""Bad-input rows about the quantize attack (a backend or level it lacks, bitsandbytes without a CUDA GPU) and
`erasure robustness` (attacks unknown, named twice or not applying to the edit, --set options of no attack run,
an --out that is the user's or a report made with other settings) - each refused before any model loads."""

from __future__ import annotations

import json

from apps.bad_input_fixtures import fixture
from apps.bad_inputs import Case


def _has_cuda() -> str | None:
    import torch

    return "this machine has a CUDA GPU" if torch.cuda.is_available() else None


@fixture
def robustness_other_report(root):
    report = root / "report"
    report.mkdir()
    settings = {"model": "toy", "edit": str(root / "another-edit"), "concept": "star", "prompts": None, "seed": 188,
                "judge": None}
    (report / "robustness.json").write_text(json.dumps({"settings": settings, "rows": {}}))
    return str(report)


CASES = [
    Case("quantize: an unknown backend", "attack --attack quantize --edit {edit_ok} --set backend=gguf "
         "--out {root}/a", "not a backend here"),
    Case("quantize: a level its backend lacks", "attack --attack quantize --edit {edit_ok} --set levels=int8,int3 "
         "--out {root}/a", "levels are int8, int4, int2"),
    Case("quantize: a level named twice", "attack --attack quantize --edit {edit_ok} --set levels=int4,int4 "
         "--out {root}/a", "once each"),
    Case("quantize: bitsandbytes without a CUDA GPU", "attack --attack quantize --edit {edit_ok} "
         "--set backend=bitsandbytes --out {root}/a", "needs a CUDA GPU", skip=_has_cuda),
    Case("quantize: bitsandbytes on --device cpu", "attack --attack quantize --edit {edit_ok} "
         "--set backend=bitsandbytes --device cpu --out {root}/a", "runs on a CUDA GPU only"),
    Case("robustness: an unknown attack", "robustness --edit {edit_ok} --attacks ringabell,nope --out {root}/r",
         "unknown attack 'nope'; available"),
    Case("robustness: an attack named twice", "robustness --edit {edit_ok} --attacks ringabell,ringabell "
         "--out {root}/r", "twice"),
    Case("robustness: --attacks naming none", "robustness --edit {edit_ok} --attacks , --out {root}/r",
         "names no attack"),
    Case("robustness: --set without the attack's name", "robustness --edit {edit_ok} --attacks ringabell "
         "--set generations=3 --out {root}/r", "ATTACK.KEY=VALUE"),
    Case("robustness: --set for an attack not run", "robustness --edit {edit_ok} --attacks ringabell "
         "--set quantize.levels=int8 --out {root}/r", "not among the attacks run"),
    Case("robustness: --set an option the attack lacks", "robustness --edit {edit_ok} --attacks ringabell "
         "--set ringabell.iterations=3 --out {root}/r", "ringabell has no option 'iterations'"),
    Case("robustness: quantize with bitsandbytes without a CUDA GPU", "robustness --edit {edit_ok} --attacks "
         "ringabell,quantize --set quantize.backend=bitsandbytes --out {root}/r", "needs a CUDA GPU", skip=_has_cuda),
    Case("robustness: p4d against a training-free edit", "robustness --edit {negprompt_edit} --attacks p4d "
         "--out {root}/r", "p4d does not apply to"),
    Case("robustness: --set for an attack that does not apply to the edit", "robustness --edit {negprompt_edit} "
         "--set p4d.iterations=3 --out {root}/r", "p4d does not apply to"),
    Case("robustness: --out is the user's folder", "robustness --edit {edit_ok} --attacks ringabell "
         "--out {users_folder}", "not made by this command"),
    Case("robustness: --out holds a report with other settings", "robustness --edit {edit_ok} --attacks ringabell "
         "--out {robustness_other_report}", "other settings"),
]
