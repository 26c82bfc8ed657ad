"""Redaction of phone numbers for logs, CLI output and error texts.

One rule project-wide: keep the first 2 characters and the last 4, star the rest
(`+14155550100` -> `+1******0100`). Strings too short for that to hide anything are all stars.
"""

from __future__ import annotations

import re

_KEEP_HEAD = 2
_KEEP_TAIL = 4
_MIN_LEN = 8  # below this, head + tail would reveal all but one or two characters

#: Anything that looks like a phone number in free text. The look-arounds keep digit runs
#: inside identifiers (hex SIDs, UUIDs, `order4521...`) out of it.
PHONE_LIKE = re.compile(r"(?<![\w+])\+?\d[\d\s().-]{6,}\d(?!\w)")
_DECIMAL = re.compile(r"\d+\.\d+")  # 0.1234567 (a duration, an amount): not a phone number
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def redact_phone(value: str | None) -> str:
    """`+14155550100` -> `+1******0100`; None -> `-`; short strings -> all stars."""
    if value is None:
        return "-"
    if len(value) < _MIN_LEN:
        return "*" * len(value)
    return value[:_KEEP_HEAD] + "*" * (len(value) - _KEEP_HEAD - _KEEP_TAIL) + value[-_KEEP_TAIL:]


def _replace(match: re.Match[str]) -> str:
    text = match.group(0)
    if sum(c.isdigit() for c in text) < 7:
        return text
    if _DECIMAL.fullmatch(text) or _ISO_DATE.fullmatch(text):
        return text
    return redact_phone(text)


def scrub(text: str) -> str:
    """Replace every phone-number-like run in `text` with its redacted form."""
    if not text:
        return text
    return PHONE_LIKE.sub(_replace, text)


__all__ = ["PHONE_LIKE", "redact_phone", "scrub"]
