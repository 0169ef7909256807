"""`python -m benchmarks.toycanvas.build [STAGE ...]`: the same as `erasure toy build`."""

import argparse

from erasers import inputs

from . import STAGES, BuildConfig, run

parser = argparse.ArgumentParser()
parser.add_argument("stages", nargs="*", default=list(STAGES))
parser.add_argument("--threads", type=inputs.POSITIVE, default=None)
args = parser.parse_args()
run(BuildConfig(), tuple(args.stages), args.threads)
