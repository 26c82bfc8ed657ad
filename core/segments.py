"""SMS encoding and segment counting (GSM 03.38 / 3GPP TS 23.038).

A pre-send estimate: the provider's own count is the billing truth. Written here (about 40
lines) instead of depending on smsutil (unmaintained, pulls in `future`) or gsm0338 (a codec
that does not count segments); see reference/providers.md section 3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The GSM 03.38 basic table (one septet each); the escape 0x1B itself is not a character.
_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The extension table: escape plus one septet, so two septets each.
_GSM_EXT = frozenset("\f^{}\\[~]|€")

GSM7_SINGLE, GSM7_PART = 160, 153  # a 6-octet concatenation header leaves 153 septets
UCS2_SINGLE, UCS2_PART = 70, 67  # ... or 67 UTF-16 code units


@dataclass(frozen=True)
class SegmentInfo:
    encoding: str  # "GSM-7" | "UCS-2"
    units: int  # septets for GSM-7, UTF-16 code units for UCS-2
    segments: int  # 0 for the empty text


_GSM_ALL = _GSM_BASIC | _GSM_EXT
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def is_gsm7(text: str) -> bool:
    """True when every character is in the GSM 03.38 basic or extension table."""
    return _GSM_ALL.issuperset(text)  # a set operation in C: this runs for every message


def count_segments(text: str) -> SegmentInfo:
    """Encoding, units and segments of `text`; one non-GSM character makes it all UCS-2."""
    if is_gsm7(text):
        encoding, single, part = "GSM-7", GSM7_SINGLE, GSM7_PART
        wide = _GSM_EXT.__contains__  # escape + septet
        doubles = sum(map(wide, text))  # counted in C
    else:
        # Astral characters (most emoji) are a UTF-16 surrogate pair: two units.
        encoding, single, part = "UCS-2", UCS2_SINGLE, UCS2_PART
        wide = _ASTRAL.fullmatch
        doubles = len(_ASTRAL.findall(text))
    units = len(text) + doubles
    if units <= single:
        return SegmentInfo(encoding, units, 1 if units else 0)
    if not doubles:  # every character one unit: nothing can straddle a boundary
        return SegmentInfo(encoding, units, -(-units // part))
    # Walk the text instead of ceil(units / part): an escape pair or a surrogate pair never
    # straddles a boundary, so a part can end one unit short.
    segments, used = 1, 0
    for c in text:
        cost = 2 if wide(c) else 1
        if used + cost > part:
            segments, used = segments + 1, 0
        used += cost
    return SegmentInfo(encoding, units, segments)
