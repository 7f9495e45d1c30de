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
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt .*or tokenizer.json"):
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


# ---------------------------------------------------------------- tokenizer.json (transformers 5's format)

@pytest.fixture(scope="module")
def json_files(files, tmp_path_factory):
    """The same tokenizer as `files`, saved by transformers' save_pretrained (pad "!", as SDXL's
    tokenizer_2): tokenizer.json + tokenizer_config.json, no vocab.json or merges.txt."""
    folder, _ = files
    out = tmp_path_factory.mktemp("tok_json")
    transformers.CLIPTokenizer.from_pretrained(folder, pad_token="!").save_pretrained(out)
    assert (out / "tokenizer.json").is_file() and not (out / "vocab.json").exists()
    return out


@pytest.fixture(scope="module")
def vocab_files_pad(files, tmp_path_factory):
    """`files` with the same tokenizer_config.json settings (pad "!") as `json_files`."""
    folder, _ = files
    return _with_config(folder, tmp_path_factory.mktemp("tok_pad"), model_max_length=77, pad_token="!")


@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_tokenizer_json_matches_transformers_and_vocab_json(json_files, vocab_files_pad, text):
    from_json = ours.load_tokenizer(json_files, subfolder=None)
    expected = _oracle(json_files)(text, add_special_tokens=False)["input_ids"]
    assert from_json.encode(text) == expected
    assert from_json.encode(text) == ours.load_tokenizer(vocab_files_pad, subfolder=None).encode(text)
    assert torch.equal(from_json([text]), ours.load_tokenizer(vocab_files_pad, subfolder=None)([text]))


def test_tokenizer_json_batches_special_tokens_and_string_merges(files, json_files, tmp_path):
    """Padding with "!" and the max length come from tokenizer_config.json; merges written as
    "a b" strings (older tokenizers files) read as the [a, b] pairs do."""
    import shutil
    _, vocab = files
    ref = _oracle(json_files)
    expected = ref(TRICKY, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    tok = ours.load_tokenizer(json_files, subfolder=None)
    assert tok.pad_token_id == vocab["!"] and tok.max_length == 77
    assert torch.equal(tok(TRICKY), expected)
    data = json.loads((json_files / "tokenizer.json").read_text(encoding="utf-8"))
    assert isinstance(data["model"]["merges"][0], list)
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    folder = tmp_path / "tokenizer"
    shutil.copytree(json_files, folder)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert torch.equal(ours.load_tokenizer(tmp_path)(TRICKY), expected)       # a diffusers folder layout


def test_tokenizer_json_that_is_not_clip_bpe(json_files, tmp_path):
    data = json.loads((json_files / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["type"] = "WordPiece"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a CLIP byte-level BPE tokenizer"):
        ours.load_tokenizer(tmp_path, subfolder=None)


def test_tokenizer_json_only_hub_repo(json_files, tmp_path, monkeypatch):
    """A hub repo with only tokenizer.json: the tokenizer files (and nothing else) are fetched."""
    import huggingface_hub
    from huggingface_hub import constants

    from tiny_models import make_cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "repo").mkdir()
    import shutil
    shutil.copytree(json_files, tmp_path / "repo" / "tokenizer")
    make_cache(tmp_path / "cache", "tiny/tok", tmp_path / "repo")
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: calls.append(kw["allow_patterns"]) or real(**kw))
    tok = ours.load_tokenizer("tiny/tok", cache_dir=tmp_path / "cache")
    assert torch.equal(tok(TRICKY), ours.load_tokenizer(json_files, subfolder=None)(TRICKY))
    assert calls[-1] == ["tokenizer/tokenizer.json"]
    assert all(p.startswith("tokenizer/") for c in calls for p in c)


_ORACLES = {}


def _oracle(folder):
    if folder not in _ORACLES:
        _ORACLES[folder] = transformers.CLIPTokenizer.from_pretrained(folder)
    return _ORACLES[folder]
