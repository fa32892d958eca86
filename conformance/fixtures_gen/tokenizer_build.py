"""Builds the small Gemma-4-like tokenizer shared by every fixture.

BPE with byte fallback, spaces as "▁" (normalizer Replace(" ", "▁"), no prefix space), byte tokens
<0x00>..<0xFF>, and every Gemma 4 control token at the id the 31B tokenizer gives it
(<pad> 0, <eos> 1, <bos> 2, <|tool_call> 48, <tool_call|> 49, <|tool_response> 50, <|think|> 98,
<|channel> 100, <channel|> 101, <|turn> 105, <turn|> 106). The other control tokens sit at free
low ids of our choice. The pipeline is exactly the one transformers' `GemmaTokenizer` class builds,
so transformers (which rebuilds the backend from vocab + merges for that class) and a plain
`tokenizers` load of tokenizer.json (what the Rust crate does) tokenize identically.
"""

from __future__ import annotations

import os

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# id -> token text for every special (control) token.
SPECIAL_TOKENS: dict[int, str] = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    5: "<|image>",
    6: "<|image|>",
    7: "<image|>",
    8: "<|audio>",
    9: "<|audio|>",
    10: "<audio|>",
    11: "<|video|>",
    12: "<|tool>",
    13: "<tool|>",
    14: "<tool_response|>",
    15: '<|"|>',
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
FIRST_NORMAL_ID = 107  # "\n", then the byte tokens, then "▁", characters and merges

CHARS = (
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "0123456789"
    ".,:;!?'\"()[]{}<>|_-=+/*#@&%$~`^\\"
)
VOCAB_SIZE = 600
# Tiny training corpus for the BPE merges (a deterministic mini BPE trainer below learns
# VOCAB_SIZE - base merges from it).
CORPUS = """\
You are a helpful assistant. Be concise.
What is the weather in Paris today? It is sunny in Paris, and the weather is nice.
Hello world! Hello, how are you? I am fine, thank you. What is your name?
The user asks a question and the model answers the question with a short answer.
Describe this image. The image shows a red car in front of a house near the river.
Call the tool get_weather with the city name, then read the response of the tool.
declaration call response thought system user model tool description parameters properties
required type STRING OBJECT INTEGER NUMBER BOOLEAN ARRAY value name city unit celsius
user model user model user model system system tool tool
Let me think about the problem step by step before I write the final answer.
There are three apples and two oranges on the table; how many fruits are there in total?
The quick brown fox jumps over the lazy dog. The dog sleeps under the tree in the garden.
"""


def _train_merges(n_merges: int, base: set[str]) -> list[tuple[str, str]]:
    """Plain BPE training on CORPUS, words = runs split before each space ("▁")."""
    text = CORPUS.replace(" ", "▁")
    words: dict[tuple[str, ...], int] = {}
    for line in text.split("\n"):
        for i, w in enumerate(line.split("▁")):
            if not w:
                continue
            w = ("▁" + w) if i > 0 else w
            sym = tuple(w)
            assert all(c in base for c in sym), w
            words[sym] = words.get(sym, 0) + 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        counts: dict[tuple[str, str], int] = {}
        for sym, n in words.items():
            for a, b in zip(sym, sym[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + n
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: (kv[1], -len(kv[0][0] + kv[0][1]), kv[0]))[0]
        merges.append(best)
        new_words: dict[tuple[str, ...], int] = {}
        for sym, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    return merges


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    unused = 0
    for i in range(FIRST_NORMAL_ID):
        if i in SPECIAL_TOKENS:
            vocab[SPECIAL_TOKENS[i]] = i
        else:
            vocab[f"<unused{unused}>"] = i
            unused += 1
    vocab["\n"] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    for c in CHARS:
        if c not in vocab:
            vocab[c] = len(vocab)
    merges = _train_merges(VOCAB_SIZE - len(vocab), set(vocab))
    for a, b in merges:
        assert a + b not in vocab, (a, b)
        vocab[a + b] = len(vocab)
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    return vocab, merges


def build_tokenizer() -> Tokenizer:
    vocab, merges = build_vocab_and_merges()
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True)
    )
    # Same components as transformers.models.gemma.tokenization_gemma.GemmaTokenizer
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    tok.add_special_tokens(
        [AddedToken(SPECIAL_TOKENS[i], special=True, normalized=False) for i in sorted(SPECIAL_TOKENS)]
    )
    for i, t in SPECIAL_TOKENS.items():
        assert tok.token_to_id(t) == i, (t, i, tok.token_to_id(t))
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "GemmaTokenizer",
    "backend": "tokenizers",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "padding_side": "left",
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1000000000000000019884624838656,
    "extra_special_tokens": {
        "boi_token": "<|image>",
        "image_token": "<|image|>",
        "eoi_token": "<image|>",
        "boa_token": "<|audio>",
        "audio_token": "<|audio|>",
        "eoa_token": "<audio|>",
        "video_token": "<|video|>",
        "sot_token": "<|turn>",
        "eot_token": "<turn|>",
        "soc_token": "<|channel>",
        "eoc_token": "<channel|>",
        "think_token": "<|think|>",
        "stc_token": "<|tool_call>",
        "etc_token": "<tool_call|>",
        "str_token": "<|tool_response>",
        "etr_token": "<tool_response|>",
        "std_token": "<|tool>",
        "etd_token": "<tool|>",
        "escape_token": '<|"|>',
    },
}


def token_ids() -> dict[str, int]:
    return {t: i for i, t in SPECIAL_TOKENS.items()}


if __name__ == "__main__":
    t = build_tokenizer()
    print(t.get_vocab_size())
    for s in ["Hello world", "<|turn>user\nWhat is the weather in Paris?<turn|>\n", "héllo  wörld\t!"]:
        e = t.encode(s, add_special_tokens=False)
        print(repr(s), e.ids, e.tokens, repr(t.decode(e.ids, skip_special_tokens=False)))
