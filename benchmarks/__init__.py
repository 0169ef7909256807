"""Evaluators and harnesses: compare, the attack's ASR harness, UnlearnCanvas, I2P, MLLMU-Med, the runners, reports,
step_cost and gpu_check, and the toy worlds. Importing the package registers the toy worlds with the library
layers below, which know them only as directories: the model name "toy" (benchmarks.toycanvas) and the toy VLM's
world (benchmarks.toyvlm)."""

from . import toycanvas, toyvlm  # noqa: F401
