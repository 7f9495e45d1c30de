"""Checks of command-line values that `python -m renoise` and `renoise eval` share (re-exported by
renoise.__main__), kept below both so that neither command module imports the other.
"""
from __future__ import annotations

import math


class UsageError(ValueError):
    """Bad command-line input."""


SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)        # what torch.Generator.manual_seed takes


def check_seed(seed) -> None:
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed {seed} is out of range; use an integer from 0 to 2**64 - 1 ({SEED_RANGE[1]}) "
                         "(negative seeds down to -2**63 also work)")


def check_guidance(flag, value) -> None:
    """--guidance / --edit-guidance: a finite number >= 0 (1: the prompt alone, no guidance)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{flag} {value}: use a finite number >= 0 (1: the prompt alone; typical edits use "
                         "1 to 10; large values overflow to NaN/inf)")


def check_text(flag, texts) -> None:
    """Prompts from the command line must be valid UTF-8 (a shell may pass undecodable bytes)."""
    for text in [texts] if isinstance(texts, str) else (texts or []):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{flag} {text.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 text; "
                             "pass it in UTF-8 (check the terminal's or file's encoding)") from None
