"""Our CLIP BPE tokenizer against transformers' CLIPTokenizer on a BPE vocabulary trained here."""
import json
from collections import Counter

import pytest
from hypothesis import given, strategies as st
import torch

transformers = pytest.importorskip("transformers")

from renoise.models import tokenizer as ours  # noqa: E402

CORPUS = """a photo of a cat sitting on the table, highly detailed. A painting of a dog in the style of
van gogh; the dog's eyes are blue and it's raining!!! photograph of mountains at sunset 1234567890
une photo d'un café à paris, élégant et très beau — 東京の夜景 写真 猫 🐱🐶 ✨ masterpiece, best quality,
ultra-detailed 8k render ((cinematic lighting)) [[trending]] {on artstation} :) ;-) we'll they've I'm you'd"""

TRICKY = [
    "",
    "a photo of a cat",
    "A PHOTO of a Cat, sitting  on\tthe table\n\nwith  tabs\t\tand newlines",
    "café à Paris, élégant, naïve Zoë, Ångström, e\u0301 (combining accent)",
    "emoji 🐱🐶✨👩‍👩‍👧 and 🇫🇷 flags",
    "東京の夜景 写真 猫 고양이 Кошка قطة",
    "punctuation runs!!! ... ?!?! ((((cinematic)))) [[x]] {y} :) ;-) --- ***",
    "the dog's eyes, it's, we'll, they've, I'm, you'd, 'quoted' and ''double''",
    "numbers 1234567890 and 3.14159 and ½ ² ٣",
    "<|startoftext|> a literal start token <|endoftext|> and end token",
    "no<|endoftext|>space",
    "<|STARTOFTEXT|> upper-case <|EndOfText|> specials",
    "   leading and trailing spaces   ",
    "odd\u00a0spaces\u2003here\u3000too \x0b\x0c",
    "control \x1c\x1d chars",
    "zero\u200bwidth",
    " ".join(["masterpiece, best quality, ultra-detailed photo of a cat"] * 12),  # far past 77 tokens
]


def _train_bpe(text, merges=300):
    """Plain BPE training on the byte-level words of `text`, CLIP style (last char carries </w>)."""
    byte_chars = ours.bytes_to_unicode()
    words = Counter()
    for piece in ours.pretokenize(ours.clean_text(text)):
        chars = [byte_chars[b] for b in piece.encode("utf-8")]
        chars[-1] += "</w>"
        words[tuple(chars)] += 1
    rules = []
    for _ in range(merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        rules.append(best)
        new_words = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    base = list(byte_chars.values())
    tokens = base + [c + "</w>" for c in base] + [a + b for a, b in rules] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, rules


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    vocab, rules = _train_bpe(CORPUS)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in rules) + "\n",
                                       encoding="utf-8")
    return folder, vocab


def _with_config(folder, tmp_path, **config):
    out = tmp_path / "tokenizer"
    out.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (out / name).write_bytes((folder / name).read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_encode_matches_transformers(files):
    folder, vocab = files
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    tok = ours.load_tokenizer(folder, subfolder=None)
    for text in TRICKY:
        expected = ref(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == expected, text
    assert len(tok.encode(TRICKY[-1])) > 77


def _added(content, normalized):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized,
            "rstrip": False, "single_word": False}


def _sd_style(vocab, normalized, pad):
    """tokenizer_config.json as the SD repositories write it (AddedToken dicts, added_tokens_decoder)."""
    special = {"bos_token": _added("<|startoftext|>", normalized), "eos_token": _added("<|endoftext|>", normalized),
               "unk_token": _added("<|endoftext|>", normalized), "pad_token": pad}
    decoder = {str(vocab[t]): _added(t, normalized) for t in ("<|startoftext|>", "<|endoftext|>")}
    return {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
            "added_tokens_decoder": decoder, **special}


@pytest.mark.parametrize("style,pad", [("plain", None), ("plain", "!"), ("sd", "<|endoftext|>"), ("sd", "!"),
                                       ("sd-raw", "!")])
def test_batch_ids_match_transformers(files, tmp_path, style, pad):
    folder, vocab = files
    if style == "plain":
        config = {"model_max_length": 77} if pad is None else {"model_max_length": 77, "pad_token": pad}
    else:
        config = _sd_style(vocab, normalized=style == "sd", pad=pad)
    folder = _with_config(folder, tmp_path, **config)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    tok = ours.load_tokenizer(folder.parent)
    expected = ref(TRICKY, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = tok(TRICKY)
    assert ids.dtype == torch.long and ids.shape == (len(TRICKY), 77)
    assert torch.equal(ids, expected)
    assert tok.pad_token_id == vocab[pad or "<|endoftext|>"]
    assert ids[-1, -1] == tok.eos_token_id  # truncation keeps EOS
    assert ids[0, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]


def test_pretokenize_categories():
    assert ours.pretokenize("it's 42 café!!") == ["it", "'s", "4", "2", "café", "!!"]
    assert ours.pretokenize("x!'s") == ["x", "!'", "s"]
    assert ours.clean_text("A\t\n B\u00a0C") == "a b c"


def test_missing_files_and_bad_tokens(files, tmp_path):
    folder, vocab = files
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        ours.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="pad token"):
        ours.CLIPTokenizer(vocab, [], pad_token="<pad>")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.CLIPTokenizer(vocab, [("q", "zz")])


_ALPHABET = st.sampled_from(list("aábcdeéz ABCÉ019٣½'’!?.,-_<|>()\t\n\u00a0\u3000\u200b\x1c") +
                            ["東", "京", "猫", "🐱", "👩\u200d👩", "e\u0301", "ß", "İ", "ﬁ", "<|endoftext|>", "'s", "'LL"])


@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_random_strings_match_transformers(files, text):
    folder, _ = files
    ref = _oracle(folder)
    tok = ours.load_tokenizer(folder, subfolder=None)
    assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


_ORACLES = {}


def _oracle(folder):
    if folder not in _ORACLES:
        _ORACLES[folder] = transformers.CLIPTokenizer.from_pretrained(folder)
    return _ORACLES[folder]
