"""CLIP's byte-level BPE tokenizer, reading a model's `vocab.json` + `merges.txt` or `tokenizer.json`.

Gives the same ids as transformers' `CLIPTokenizer` on the same files (without ftfy):

    text → NFC → runs of whitespace to " " → lowercase
         → pieces: 's 't 're 've 'm 'll 'd | letters+ | one digit | other (not space/letter/digit)+
         → each piece as byte-level characters, "</w>" on its last one → BPE merges by rank → ids
    [BOS] ids[:max_length-2] [EOS] [PAD]...   (length max_length = 77)

"Letter" and "digit" are the Unicode categories L* and N* (regex's \\p{L}, \\p{N}), read from
`unicodedata`, since stdlib `re` cannot name them. The special tokens (`<|startoftext|>`,
`<|endoftext|>`, and other added tokens) written literally in a prompt are matched as themselves.
"""
from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path

import torch

__all__ = ["CLIPTokenizer", "load_tokenizer", "bytes_to_unicode", "warn_if_truncated"]

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode White_Space (what the tokenizers library's \s means); Python's str.isspace adds \x1c-\x1f.
_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                   + "".join(chr(c) for c in range(0x2000, 0x200B)))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = bytes_to_unicode()


def _kind(ch: str) -> str:
    if ch in _SPACE:
        return " "
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "O"


def clean_text(text: str) -> str:
    """NFC, whitespace runs to one space, lowercase."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for ch in text:
        if ch in _SPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(ch)
            in_space = False
    return "".join(out).lower()


def pretokenize(text: str) -> list[str]:
    """Split cleaned text as CLIP's pattern `'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == " ":
            i += 1
            continue
        if text[i] == "'":
            hit = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if hit:
                pieces.append(hit)
                i += len(hit)
                continue
        j = i + 1
        if kind != "N":  # digits are single pieces; letters and "other" take the whole run
            while j < n and _kind(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


class CLIPTokenizer:
    """`tok(texts) -> LongTensor [B, max_length]`; `tok.encode(text) -> list[int]` (no BOS/EOS/padding)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, bos_token="<|startoftext|>",
                 eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                 max_length: int = 77, added_tokens: dict[str, int] | None = None,
                 normalized_tokens: frozenset[str] = frozenset()):
        self.vocab = dict(vocab)
        for name, token in [("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)]:
            if token not in self.vocab:
                raise ValueError(f"the {name} token {token!r} is not in the vocabulary")
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        for a, b in self.ranks:
            if a + b not in self.vocab:
                raise ValueError(f"merge {a!r} {b!r} makes {a + b!r}, which is not in the vocabulary")
        self.bos_token_id = self.vocab[bos_token]
        self.eos_token_id = self.vocab[eos_token]
        self.pad_token_id = self.vocab[pad_token]
        self.unk_token_id = self.vocab[unk_token]
        self.max_length = max_length
        specials = {bos_token, eos_token, pad_token, unk_token, *(added_tokens or {})}
        self.added = {t: (added_tokens or {}).get(t, self.vocab.get(t)) for t in specials}
        if any(v is None for v in self.added.values()):
            raise ValueError(f"added tokens without an id: {[t for t, v in self.added.items() if v is None]}")
        # Special tokens are found in the raw text, or (the "normalized" ones, as transformers' files
        # may flag them) in the cleaned, lowercased text. Longest first: no prefix shadows a token.
        by_len = sorted(self.added, key=len, reverse=True)
        self._raw_specials = [t for t in by_len if t not in normalized_tokens]
        self._clean_specials = [t for t in by_len if t in normalized_tokens]
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_files(cls, vocab_file, merges_file, **kwargs) -> "CLIPTokenizer":
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        return cls(vocab, _read_merges(Path(merges_file)), **kwargs)

    def _bpe(self, piece: str) -> list[int]:
        if piece in self._cache:
            return self._cache[piece]
        word = [_BYTE_CHARS[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            first, second = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.vocab.get(sym, self.unk_token_id) for sym in word]
        self._cache[piece] = ids
        return ids

    @staticmethod
    def _split(text: str, specials: list[str]):
        """Yield (segment, is_special) with the literal `specials` cut out of `text`."""
        start = i = 0
        while i < len(text):
            hit = next((s for s in specials if text.startswith(s, i)), None)
            if hit:
                yield text[start:i], False
                yield hit, True
                i = start = i + len(hit)
            else:
                i += 1
        yield text[start:], False

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without BOS/EOS, truncation or padding."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"prompt {text!r} is not valid text: it holds bytes that are not UTF-8 (lone "
                             "surrogates); write it in UTF-8") from None
        ids = []
        for raw, special in self._split(text, self._raw_specials):
            if special:
                ids.append(self.added[raw])
                continue
            for segment, special in self._split(clean_text(raw), self._clean_specials):
                if special:
                    ids.append(self.added[segment])
                else:
                    for piece in pretokenize(segment):
                        ids.extend(self._bpe(piece))
        return ids

    def decode(self, ids) -> str:
        """Text of token ids (special tokens dropped, words separated by one space); `encode`'s
        inverse up to text cleaning."""
        if not hasattr(self, "_inverse"):
            self._inverse = {i: t for t, i in self.vocab.items()}
            self._byte_of = {c: b for b, c in _BYTE_CHARS.items()}
        specials = set(self.added.values())
        chars = "".join(self._inverse.get(int(i), "") for i in ids if int(i) not in specials)
        words = [bytes(self._byte_of[c] for c in w if c in self._byte_of).decode("utf-8", errors="replace")
                 for w in chars.split("</w>")]
        return " ".join(w for w in words if w)

    def __call__(self, texts, max_length: int | None = None) -> torch.LongTensor:
        """[B, max_length]: BOS, the first max_length-2 ids, EOS, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        length = max_length or self.max_length
        if length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {length}")
        out = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id, *self.encode(text)[: length - 2], self.eos_token_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def _token_content(value):
    return value.get("content") if isinstance(value, dict) else value


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: one "a b" pair a line, after an optional "#version" line."""
    merges = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"malformed line in {path}: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path):
    """(vocab, merges, added tokens, normalized tokens) from a `tokenizers` file (tokenizer.json),
    as transformers 5 saves a CLIP tokenizer. Merges may be "a b" strings or [a, b] pairs."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise ValueError(f"{path} is not a CLIP byte-level BPE tokenizer (model type {model.get('type')!r}, "
                         f"end_of_word_suffix {model.get('end_of_word_suffix')!r}; expected BPE with '</w>')")
    merges = []
    for m in model.get("merges", []):
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2:
            raise ValueError(f"malformed merge in {path}: {m!r}")
        merges.append((pair[0], pair[1]))
    vocab, added, normalized = dict(model["vocab"]), {}, set()
    for entry in data.get("added_tokens") or []:
        added[entry["content"]] = int(entry["id"])
        vocab.setdefault(entry["content"], int(entry["id"]))   # added tokens are part of the vocabulary
        if entry.get("normalized"):
            normalized.add(entry["content"])
    return vocab, merges, added, normalized


def load_tokenizer(source, subfolder: str | None = "tokenizer", **hub) -> CLIPTokenizer:
    """From a diffusers folder / hub id (`subfolder`) or a tokenizer folder (`subfolder=None`).

    Reads `vocab.json` + `merges.txt`, or else `tokenizer.json` (what transformers 5 saves), and
    the special tokens and `model_max_length` from `tokenizer_config.json` /
    `special_tokens_map.json` when present.
    """
    folder = _resolve_folder(source, subfolder, **hub)
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        if (folder / name).is_file():
            settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges, added, normalized = _read_merges(folder / "merges.txt"), {}, set()
    elif (folder / "tokenizer.json").is_file():
        vocab, merges, added, normalized = _read_tokenizer_json(folder / "tokenizer.json")
    else:
        raise FileNotFoundError(_missing_message(folder))
    kwargs = {}
    specials = ("bos_token", "eos_token", "pad_token", "unk_token")
    for key in specials:
        if settings.get(key) is not None:
            kwargs[key] = _token_content(settings[key])
    max_length = settings.get("model_max_length")
    if isinstance(max_length, int) and max_length <= 4096:  # transformers writes 1e30 for "unlimited"
        kwargs["max_length"] = max_length
    decoder = settings.get("added_tokens_decoder") or {}
    added.update({_token_content(v): int(k) for k, v in decoder.items()})
    entries = [*decoder.values(), *(settings[k] for k in specials if settings.get(k) is not None)]
    normalized |= {e["content"] for e in entries if isinstance(e, dict) and e.get("normalized")}
    return CLIPTokenizer(vocab, merges, added_tokens=added or None, normalized_tokens=frozenset(normalized),
                         **kwargs)


def _missing_message(folder: Path) -> str:
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return (f"no CLIP tokenizer files in {folder} (it has {present}): expected vocab.json and merges.txt "
            "(the original CLIP format), or tokenizer.json (what transformers 5 saves)")


_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_BPE_FILES = ("vocab.json", "merges.txt")


def _resolve_folder(source, subfolder, **hub) -> Path:
    """The local tokenizer folder: `source/subfolder`, `source` itself, or the files of a hub id
    (only the small tokenizer files are fetched: vocab.json and merges.txt, or else tokenizer.json;
    or they are found in the cache when offline)."""
    from .loading import hub_snapshot, is_hub_id

    if is_hub_id(source):
        pre = f"{subfolder}/" if subfolder else ""
        root = hub_snapshot(source, [pre + f for f in _CONFIG_FILES + _BPE_FILES], **hub)
        if not all((root / pre / f).is_file() for f in _BPE_FILES):
            root = hub_snapshot(source, [pre + "tokenizer.json"], **hub)
        return root / subfolder if subfolder else root
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{source!r} is neither a folder nor a hub id of the form 'org/name'")
    if subfolder and (root / subfolder).is_dir():
        return root / subfolder
    if (root / "vocab.json").is_file() or (root / "tokenizer.json").is_file():
        return root
    raise FileNotFoundError(f"no tokenizer in {root}: expected {root / (subfolder or '')} with vocab.json and "
                            "merges.txt, or tokenizer.json")


_WARNED_LONG = set()     # prompts already warned about (once per prompt and token limit)


def warn_if_truncated(tokenizer, prompt: str) -> None:
    """Warn once per prompt that is longer than the text encoder's window (77 tokens with BOS and
    EOS for CLIP): how many tokens it has and the text that is dropped. Long-prompt weighting
    (splitting a prompt into several windows) is not supported."""
    limit = getattr(tokenizer, "max_length", None)
    encode = getattr(tokenizer, "encode", None)
    if limit is None or encode is None or (prompt, limit) in _WARNED_LONG:
        return
    ids = encode(prompt)
    if len(ids) <= limit - 2:
        return
    _WARNED_LONG.add((prompt, limit))
    decode = getattr(tokenizer, "decode", None)
    dropped = decode(ids[limit - 2:]) if decode is not None else f"{len(ids) - (limit - 2)} tokens"
    dropped = dropped if len(dropped) <= 200 else dropped[:200] + "..."
    warnings.warn(f"prompt {prompt[:60]!r}... has {len(ids) + 2} tokens with BOS and EOS, more than the text "
                  f"encoder's {limit}; the text after token {limit - 2} is dropped: {dropped!r}. Long-prompt "
                  "weighting (several windows) is not supported: shorten the prompt", UserWarning, stacklevel=3)
