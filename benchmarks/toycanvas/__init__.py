"""ToyCanvas: the embedded miniature of UnlearnCanvas and its toy models, trained by `erasure toy build`."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
CLIP_DIR = WEIGHTS_DIR / "clip"
CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"
IP_ADAPTER_DIR = WEIGHTS_DIR / "ip_adapter"

# The library knows no model by name: "toy" is this pipeline directory once this package is imported (the `erasure`
# command and the tests import it).
from erasers.models import MODEL_ALIASES  # noqa: E402

MODEL_ALIASES.setdefault("toy", PIPELINE_DIR)
