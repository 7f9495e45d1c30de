"""The T5 tokenizer of SD3 (`tokenizer_3`) and FLUX.1 (`tokenizer_2`): SentencePiece Unigram over
a `tokenizer.json`, giving the ids of transformers' `T5TokenizerFast`. Needs `pip install renoise[t5]`.

    text → SentencePiece normalization (the file's precompiled nmt_nfkc charsmap)
         → split on whitespace (runs collapse) → "▁" before each word
         → Unigram (Viterbi over the vocabulary's log-probabilities; unknown → <unk> = 2)
         → ids[:max_length-1] </s>(1) <pad>(0)...           (SD3: max_length 256, FLUX.1: 512)

Special tokens written literally (`</s>`, `<extra_id_0>`, ...) are matched as themselves.

Why the `tokenizers` package, not our own code: the normalization step is SentencePiece's
precompiled charsmap, which `tokenizers` (and so transformers) applies per extended grapheme cluster
(Unicode UAX #29: a whole cluster is looked up first, then its characters one by one). Python's
standard library has no grapheme segmentation (and an earlier pure-Python Unigram in this project
was reported to differ from T5TokenizerFast on multi-codepoint clusters and Metaspace details), so
exact equality would need our own UAX #29 segmenter and its data tables, for no gain.
`tokenizers` is the engine T5TokenizerFast itself runs, so the ids are the same by construction;
it is a small binary wheel, kept out of the core install as the optional extra `renoise[t5]`.

Which pipeline: transformers 5 rebuilds T5's pipeline from a tokenizer.json's vocabulary and
charsmap (Precompiled normalizer; WhitespaceSplit + Metaspace "always"; "$A </s>"), whatever
normalizer and pre-tokenizer the file names — newer converters write Strip + Replace(" {2,}" → "▁")
and Metaspace "first", older ones do not. This module does the same, so it equals transformers 5 on
every variant of the file, and equals SentencePiece's own whitespace handling (runs of spaces
collapse). (transformers 4's T5TokenizerFast ran a file's pipeline verbatim; on newer-converter
files it then differs from both on runs of spaces.)
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import torch

try:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
except ImportError:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("the T5 tokenizer (SD3, FLUX.1) needs the `tokenizers` package: pip install renoise[t5]") from None

__all__ = ["T5Tokenizer", "load_t5_tokenizer"]


def _charsmap(normalizer) -> bytes | None:
    """The Precompiled normalizer's charsmap in a tokenizer.json normalizer entry (or a Sequence)."""
    if not normalizer:
        return None
    parts = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return base64.b64decode(part["precompiled_charsmap"])
    return None


class T5Tokenizer:
    """T5's SentencePiece Unigram tokenizer (see the module docstring). Build with `from_json` or
    `load_t5_tokenizer`. Token ids: pad 0, eos 1, unk 2 (T5's layout; read from the file)."""

    def __init__(self, vocab: list[tuple[str, float]], *, charsmap: bytes | None, added_tokens: list[dict],
                 unk_id: int = 2, pad_token: str = "<pad>", eos_token: str = "</s>", max_length: int = 512):
        tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in vocab], unk_id=unk_id, byte_fallback=False))
        if charsmap is not None:
            tok.normalizer = normalizers.Precompiled(charsmap)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        for entry in added_tokens:
            token = AddedToken(entry["content"], single_word=entry.get("single_word", False),
                               lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                               normalized=entry.get("normalized", False), special=entry.get("special", True))
            (tok.add_special_tokens if entry.get("special", True) else tok.add_tokens)([token])
        self.pad_token_id, self.eos_token_id = tok.token_to_id(pad_token), tok.token_to_id(eos_token)
        if self.pad_token_id is None or self.eos_token_id is None:
            raise ValueError(f"the vocabulary has no {pad_token!r} or {eos_token!r} token; is this a T5 tokenizer?")
        tok.post_processor = processors.TemplateProcessing(
            single=["$A", eos_token], pair=["$A", eos_token, "$B", eos_token],
            special_tokens=[(eos_token, self.eos_token_id)])
        self.pad_token, self.eos_token, self.unk_token_id = pad_token, eos_token, unk_id
        self.max_length = int(max_length)
        self._tok = tok

    @classmethod
    def from_json(cls, path, **kwargs) -> "T5Tokenizer":
        """From a `tokenizer.json` (a Unigram model, as transformers saves T5's tokenizer)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        model = data.get("model") or {}
        if model.get("type") != "Unigram":
            raise ValueError(f"{path} is not a SentencePiece Unigram tokenizer (model type {model.get('type')!r}); "
                             "T5's tokenizer.json has model type 'Unigram'")
        unk = model.get("unk_id")
        return cls([tuple(v) for v in model["vocab"]], charsmap=_charsmap(data.get("normalizer")),
                   added_tokens=data.get("added_tokens") or [], unk_id=2 if unk is None else int(unk), **kwargs)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text with its final </s>, no truncation or padding."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        self._tok.no_truncation()
        self._tok.no_padding()
        return self._tok.encode(text).ids

    def __call__(self, texts, max_length: int | None = None, *, return_mask: bool = False):
        """[B, max_length] int64: each text's ids cut to max_length - 1, </s>, then <pad> (what
        T5TokenizerFast gives with padding="max_length", truncation=True). With return_mask, also
        the attention mask [B, max_length] (1 = token, 0 = padding)."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a list of strings")
        length = int(max_length or self.max_length)
        if length < 1:
            raise ValueError(f"max_length must be at least 1 (room for </s>), got {length}")
        self._tok.enable_truncation(length)
        self._tok.enable_padding(length=length, pad_id=self.pad_token_id, pad_token=self.pad_token)
        enc = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long).reshape(len(texts), length)
        if not return_mask:
            return ids
        return ids, torch.tensor([e.attention_mask for e in enc], dtype=torch.long).reshape(len(texts), length)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_t5_tokenizer(source, subfolder: str | None = None, **hub) -> T5Tokenizer:
    """From a tokenizer folder holding `tokenizer.json` (transformers' `save_pretrained`), a
    diffusers pipeline folder or hub id with `subfolder` ("tokenizer_3" for SD3, "tokenizer_2" for
    FLUX.1). `model_max_length` comes from tokenizer_config.json when it is a real limit.
    `hub`: cache_dir, revision, local_files_only (a hub id fetches only the small tokenizer files)."""
    from .loading import hub_snapshot, is_hub_id

    pre = f"{subfolder}/" if subfolder else ""
    if is_hub_id(source):
        folder = hub_snapshot(source, [pre + "tokenizer.json", pre + "tokenizer_config.json"], **hub) / (subfolder or "")
    else:
        folder = Path(source) / (subfolder or "")
    if not (folder / "tokenizer.json").is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        hint = (" It has spiece.model only: convert it once with transformers "
                "(T5TokenizerFast.from_pretrained(folder).save_pretrained(folder))." if "spiece.model" in present else
                " For a diffusers pipeline folder pass subfolder='tokenizer_3' (SD3) or 'tokenizer_2' (FLUX.1).")
        raise FileNotFoundError(f"no tokenizer.json in {folder} (it has {present}).{hint}")
    kwargs = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for key in ("pad_token", "eos_token"):
            value = cfg.get(key)
            if value is not None:
                kwargs[key] = value.get("content") if isinstance(value, dict) else value
        if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] <= 1 << 20:
            kwargs["max_length"] = cfg["model_max_length"]
    return T5Tokenizer.from_json(folder / "tokenizer.json", **kwargs)

