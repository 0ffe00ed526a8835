"""The CLIP BPE tokenizer, written offline from the vocabulary that open_clip ships.

Every CLIP text encoder used by Stable Diffusion (OpenAI ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x)
shares one byte-level BPE vocabulary of 49408 tokens. open_clip carries its merges file
(`bpe_simple_vocab_16e6.txt.gz`), so a `transformers.CLIPTokenizer` can be built without the model hub:

    from ldm.models.tokenizer import write_clip_tokenizer
    from transformers import CLIPTokenizer
    write_clip_tokenizer("/tmp/tok")                    # SD 1.x: pads with <|endoftext|> (id 49407)
    write_clip_tokenizer("/tmp/tok2", pad_token="!")    # SD 2.x: pads with "!" (id 0), like open_clip
    CLIPTokenizer.from_pretrained("/tmp/tok")(["a photo of a cat"], padding="max_length").input_ids

Ids match `open_clip.tokenize` for ordinary captions (open_clip pads with 0, which is "!"). The tokenizer
is saved with `split_special_tokens=True`, so text in a caption is always tokenized as plain text. Without
it, transformers matches special tokens in the caption first and, with pad "!", turns every "!" into the
pad token (the diffusers SD 2.x quirk, huggingface/diffusers#4153).

Known remaining differences: open_clip also runs `ftfy.fix_text` and `html.unescape` (so HTML entities like
`&amp;`, curly quotes, ligatures and mojibake can tokenize differently), and it treats a literal
"<end_of_text>" in a caption as its end token.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
# Vocabulary = 256 byte tokens + the same 256 ending a word ("</w>") + merges + 2 special tokens. The gzip
# holds a version line and then more merges than that leaves room for; CLIP uses the first NUM_MERGES.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2


def bpe_vocab_path() -> Path:
    """The merges file that open_clip ships inside its package (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("open_clip is not installed: it ships the CLIP BPE vocabulary")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2 style reversible byte -> printable-unicode map, in the order CLIP numbers the byte tokens.

    Printable latin-1 bytes map to themselves; the remaining 68 bytes (whitespace, control characters, ...)
    map to code points 256, 257, ... in byte order, and are listed after the printable ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in [*zip(printable, printable), *zip(others, range(256, 256 + len(others)))]}


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token -> id map and ranked merges: byte chars, byte chars + "</w>", merged pairs, bos, eos.

    Cached: treat the returned dict and list as read-only.
    """
    with gzip.open(bpe_path or bpe_vocab_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
    byte_chars = list(byte_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path or bpe_vocab_path()}: {len(vocab)} distinct CLIP tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def clip_tokenizer(model_max_length: int = 77, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """An in-memory `CLIPTokenizer` with CLIP's vocabulary (transformers 5 takes the vocab and merges directly).

    pad_token: "<|endoftext|>" for SD 1.x, "!" for SD 2.x / open_clip's zero padding.
    Special tokens typed in a caption are tokenized as text (`split_special_tokens=True`), as open_clip does.
    """
    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not a CLIP vocabulary token")
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token,
        bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, split_special_tokens=True,
    )


def write_clip_tokenizer(
    out_dir: str | Path, model_max_length: int = 77, pad_token: str = EOS_TOKEN
) -> CLIPTokenizer:
    """Write `clip_tokenizer(model_max_length, pad_token)` to `out_dir` for `CLIPTokenizer.from_pretrained`.

    `save_pretrained` writes `tokenizer_config.json` and `tokenizer.json`; the canonical `vocab.json` and
    `merges.txt` (what Stable Diffusion repos ship and transformers 4 reads) are written alongside.
    """
    tokenizer = clip_tokenizer(model_max_length, pad_token)
    vocab, merges = clip_vocab_and_merges()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return tokenizer
