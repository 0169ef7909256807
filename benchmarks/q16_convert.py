"""Q16's prompt embeddings, read without pickle. Q16 publishes them as a pickle (`prompts.p`), and unpickling a file
runs whatever code it holds, so `erasure bench i2p --q16-prompts` reads only NumPy (.npy, no pickled objects),
safetensors and torch's weights-only format. This command converts the published pickle once, and only when told
the file is trusted:

    python -m benchmarks.q16_convert prompts.p --trust --out q16_prompts.npy
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from erasers.errors import UsageError
from erasers.files import check_output_path, save_atomically
from erasers.inputs import check_input

CONVERT = "python -m benchmarks.q16_convert {path} --trust --out q16_prompts.npy"
FORMATS = ".npy, .safetensors or .pt"


def _npy(file: Path):
    value = np.load(file, allow_pickle=False)  # a pickle (or an .npy of objects) raises, never runs
    if not isinstance(value, np.ndarray):
        raise ValueError("not a single array")
    return torch.from_numpy(value)


def _safetensors(file: Path):
    from safetensors.torch import load_file

    tensors = load_file(file)
    if len(tensors) != 1:
        raise ValueError(f"{len(tensors)} tensors, not 1")
    return next(iter(tensors.values()))


def _weights_only(file: Path):
    with warnings.catch_warnings():  # its note on a pickle's protocol would precede the one-line refusal
        warnings.simplefilter("ignore")
        value = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    return torch.as_tensor(value)


READERS = {".npy": _npy, ".safetensors": _safetensors, ".pt": _weights_only, ".pth": _weights_only}


def read_q16_prompts(path: str | Path) -> torch.Tensor:
    """Q16's two prompt embeddings (2 x CLIP's projection width), from a file that cannot run code."""
    convert = CONVERT.format(path=shlex.quote(str(path)))
    file = check_input(path, "--q16-prompts", f"pass Q16's prompt embeddings as {FORMATS} (convert Q16's published "
                       f"prompts.p with `{convert}`)")
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise UsageError(f"--q16-prompts {path} is not a {FORMATS} file, and a pickle such as Q16's prompts.p is "
                         f"never unpickled: if you trust it, convert it with `{convert}` and pass the .npy")
    try:
        embeddings = reader(file)
    except Exception as error:  # noqa: BLE001 - each format's reader raises its own kinds for a damaged file
        raise UsageError(f"--q16-prompts {path} is not a readable {file.suffix} file of embeddings "
                         f"({type(error).__name__}); a pickle is never unpickled: if you trust it, convert it with "
                         f"`{convert}`") from None
    return _checked(embeddings, f"--q16-prompts {path}")


def _checked(embeddings: torch.Tensor, what: str) -> torch.Tensor:
    if not embeddings.is_floating_point():
        raise UsageError(f"{what} holds {embeddings.dtype} values; Q16 needs two rows of float embeddings")
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 or embeddings.shape[1] == 0:
        raise UsageError(f"{what} holds an array of shape {tuple(embeddings.shape)}; Q16 needs 2 rows (appropriate, "
                         "inappropriate) of CLIP embeddings")
    if not torch.isfinite(embeddings.float()).all():
        raise UsageError(f"{what} holds NaN or infinite values; pass Q16's embeddings")
    return embeddings


def convert(source: str | Path, out: str | Path, trust: bool) -> Path:
    """Unpickle `source` (only with `trust`) and write its embeddings to `out` as a plain .npy."""
    source, out = check_input(source, "the source", "pass Q16's prompts.p"), Path(out)
    if not trust:
        raise UsageError(f"{source} is a pickle, and unpickling runs any code the file holds; nothing was read. "
                         "Pass --trust only for a file you trust (Q16's own prompts.p)")
    if out.suffix != ".npy":
        raise UsageError(f"--out {out} must end in .npy")
    check_output_path(out, "--out", new=True)
    import pickle

    try:
        with open(source, "rb") as handle:
            value = pickle.load(handle)  # trusted by the user's --trust
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
    except Exception as error:  # noqa: BLE001 - unpickling can raise anything
        raise UsageError(f"{source} is not a pickle of an embedding array ({type(error).__name__}); pass Q16's "
                         "prompts.p") from None
    _checked(torch.from_numpy(array), str(source))

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return save_atomically(out, save)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"erasure: error: {message} (see `python -m benchmarks.q16_convert --help`)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m benchmarks.q16_convert", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="Q16's prompts.p (a pickle)")
    parser.add_argument("--trust", action="store_true", help="you trust the file: it is unpickled, which can run "
                        "code; without it nothing is read")
    parser.add_argument("--out", required=True, help="the .npy to write (new)")
    args = parser.parse_args(argv)
    try:
        written = convert(args.source, args.out, args.trust)
    except UsageError as error:
        print(f"erasure: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote {written}: pass it as --q16-prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
