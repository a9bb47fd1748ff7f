"""Offline CLIP tokenizers for the SD v1 (transformers) and SD v2 (open_clip) text encoders.

Both use OpenAI's CLIP BPE, which ships inside ``open_clip_torch`` as
``bpe_simple_vocab_16e6.txt.gz``, so nothing is downloaded. Ids agree with each other up to and
including the end token; they differ only in padding (v1 pads with 49407, v2 with 0).
"""

import gzip
from functools import lru_cache

from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
# The file starts with a version line and holds more merges than CLIP used: CLIP's vocabulary is
# 49408 = 256 bytes + 256 bytes with "</w>" + 48894 merges + 2 specials (as in open_clip's SimpleTokenizer).
_NUM_MERGES = 49408 - 2 * 256 - 2


@lru_cache
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and merges of OpenAI's CLIP BPE, in open_clip's order."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


@lru_cache
def clip_tokenizer(pad_token: str = END_TOKEN) -> CLIPTokenizer:
    """transformers' CLIPTokenizer for ``openai/clip-vit-large-patch14``, built offline.

    Start 49406, end 49407, pad ``pad_token`` (SD v1 pads with the end token), 77 tokens. Cached:
    callers share one instance, so do not mutate it.
    """
    vocab, merges = clip_bpe()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        unk_token=END_TOKEN,
        pad_token=pad_token,
        model_max_length=CONTEXT_LENGTH,
    )


@lru_cache
def open_clip_tokenizer(context_length: int = CONTEXT_LENGTH) -> SimpleTokenizer:
    """open_clip's tokenizer as SD v2 used it: pads with 0; truncation keeps the end token last.

    Call it on a list of strings to get a LongTensor [B, context_length].
    """
    return SimpleTokenizer(context_length=context_length)
