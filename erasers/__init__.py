"""erasure-suite, diffusion side: model loading, erasers and edits."""

__version__ = "0.1.0"

from .errors import UsageError
from .models import LoadedPipeline, load_pipeline

__all__ = ["UsageError", "LoadedPipeline", "load_pipeline", "__version__"]
