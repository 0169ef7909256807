"""CLIP's real BPE vocabulary as a `transformers.CLIPTokenizer`, built offline from the copy open_clip ships.

The vocabulary is laid out as OpenAI's CLIP lays it out (byte symbols, the same with an end-of-word mark, one
entry per merge, then the two special tokens), so ids match those of `openai/clip-vit-large-patch14` and any
English prompt tokenizes exactly as in Stable Diffusion 1.x.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

MERGE_COUNT = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level mapping: printable bytes map to themselves, the rest to unused code points.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def open_clip_vocab_path() -> Path:
    """CLIP's BPE vocabulary as open_clip ships it, found without importing open_clip (whose import needs ftfy and
    timm, which a machine that only carries the wheel, such as a lent GPU's, may not have)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed: pip install open_clip_torch (it ships CLIP's BPE vocabulary)")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:MERGE_COUNT + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(out_dir)
    return tokenizer
