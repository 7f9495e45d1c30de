"""The T5 tokenizer against transformers' T5TokenizerFast (test oracle), on a SentencePiece Unigram
model trained here (nmt_nfkc normalization, as T5's) and saved by transformers' save_pretrained."""
import io
import json
import random
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

from renoise.models.t5_tokenizer import T5Tokenizer, load_t5_tokenizer  # noqa: E402

SYLLABLES = ["ka", "ri", "to", "mu", "sen", "the", "qu", "ng", "é", "ï", "ß", "ö", "ç", "ñ", "日", "本", "語", "😀",
             "ﬁ", "Ⅸ", "１", "²", "x", "z", "a", "e", "o", "st", "photo", "cat"]
# characters the normalizer or the grapheme segmentation treat specially
ODD = ["e\u0301", "a\u0308\u0304", "👩\u200d👩\u200d👧", "🇫🇷", "👍🏽", "\u1100\u1161\u11a8", "ﬀ", "Ａｂｃ", "①", "™",
       "\u200b", "\u00a0", "\u3000", "\t", "\n", "\r\n", "\u2028", "<extra_id_5>", "</s>", "<pad>", "<unk>", "x</s>y",
       "<extra_id_0><extra_id_99>", "ʼ", "«»", "…", "ǅ", "İ", "ﷺ", "\U0001d400", "\x00", "\x7f", "̀", "🏳️‍🌈", "Å"]


def _word(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(a T5 tokenizer folder saved by transformers, the same with a newer converter's normalizer
    and pre-tokenizer written into its tokenizer.json)."""
    rng = random.Random(0)
    words = [_word(rng) for _ in range(800)]
    corpus = [" ".join(rng.choice(words) + rng.choice(["", ",", ".", "!"]) for _ in range(12)) for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=500,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=0.9995, minloglevel=2)
    root = tmp_path_factory.mktemp("t5tok")
    (root / "spm").mkdir()
    (root / "spm" / "spiece.model").write_bytes(buf.getvalue())
    transformers.T5TokenizerFast.from_pretrained(root / "spm").save_pretrained(root / "saved")
    data = json.loads((root / "saved" / "tokenizer.json").read_text())
    assert len(data["model"]["vocab"]) == 600 and any(t["content"] == "<extra_id_99>" for t in data["added_tokens"])
    pre = data["normalizer"]
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        pre, {"type": "Strip", "strip_left": False, "strip_right": True},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"}]}
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
    (root / "newer").mkdir()
    for f in (root / "saved").iterdir():
        (root / "newer" / f.name).write_text(f.read_text())
    (root / "newer" / "tokenizer.json").write_text(json.dumps(data))
    return root / "saved", root / "newer"


def _strings(n=1100, seed=1):
    rng = random.Random(seed)
    out = ["", " ", "   ", "\t\n", "a", " a", "a ", "  a  b  ", "a\u3000\u3000b", "<extra_id_5>"]
    while len(out) < n:
        k = rng.random()
        count = rng.choice([1, 3, 10, 40]) if k < 0.8 else rng.choice([300, 600])   # long ones get truncated
        parts = []
        for _ in range(count):
            parts.append(rng.choice(ODD) if rng.random() < 0.15 else _word(rng))
            parts.append(rng.choice([" ", " ", " ", "  ", "   ", "", "\t", " \n ", "\u00a0"]))
        s = "".join(parts)
        out.append(rng.choice(["", " ", "  "]) + s if rng.random() < 0.3 else s)
    return out


@pytest.mark.parametrize("variant", ["saved", "newer-converter"])
def test_equals_t5_tokenizer_fast(folders, variant):
    folder = folders[0] if variant == "saved" else folders[1]
    ref = transformers.T5TokenizerFast.from_pretrained(folder)
    ours = load_t5_tokenizer(folder)
    texts = _strings()
    assert len(texts) >= 1000 and "" in texts
    for length in (256, 512, 16):
        expected = ref(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids, mask = ours(texts, length, return_mask=True)
        bad = [i for i in range(len(texts)) if not bool((ids[i] == expected.input_ids[i]).all())]
        assert not bad, (length, [texts[i] for i in bad[:3]])
        assert (mask == expected.attention_mask).all()
        if length == 256:
            assert (mask.sum(1) == 256).sum() > 50      # truncation really happened
            assert (mask.sum(1) < 20).sum() > 50        # and padding
    for t in texts[:200]:
        assert ours.encode(t) == ref(t).input_ids
    assert len(ours) == len(ref)


def test_pipeline_subfolder_and_errors(folders, tmp_path):
    saved = folders[0]
    pipe = tmp_path / "pipe" / "tokenizer_3"
    pipe.mkdir(parents=True)
    for f in saved.iterdir():
        (pipe / f.name).write_text(f.read_text())
    tok = load_t5_tokenizer(tmp_path / "pipe", subfolder="tokenizer_3")
    assert tok("a cat", 8).tolist()[0][-3:] == [0, 0, 0]
    with pytest.raises(FileNotFoundError, match="tokenizer_3"):
        load_t5_tokenizer(tmp_path / "pipe")
    with pytest.raises(ValueError, match="Unigram"):
        (tmp_path / "bpe.json").write_text(json.dumps({"model": {"type": "BPE"}}))
        T5Tokenizer.from_json(tmp_path / "bpe.json")
    with pytest.raises(TypeError):
        tok([1, 2])


def test_missing_tokenizers_names_the_extra():
    code = ("import sys; sys.modules['tokenizers'] = None\n"
            "try:\n    import renoise.models.t5_tokenizer\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install renoise[t5]" in out.stdout, out.stdout + out.stderr


def test_hub_id_fetches_only_the_tokenizer_files(folders, tmp_path, monkeypatch):
    from tiny_models import FakeHub
    pipe = tmp_path / "pipe"
    (pipe / "tokenizer_2").mkdir(parents=True)
    for f in folders[0].iterdir():
        (pipe / "tokenizer_2" / f.name).write_text(f.read_text())
    (pipe / "tokenizer_2" / "spiece.model").write_bytes(b"not read")
    hub = FakeHub({"org/flux": pipe}, tmp_path / "cache").install(monkeypatch)
    tok = load_t5_tokenizer("org/flux", subfolder="tokenizer_2")
    assert sorted(hub.fetched) == ["tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json"]
    ref = transformers.T5TokenizerFast.from_pretrained(folders[0])
    texts = _strings(50, seed=3)
    assert tok(texts, 512).tolist() == ref(texts, padding="max_length", max_length=512, truncation=True).input_ids
