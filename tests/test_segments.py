"""Every test vector of reference/providers.md section 3, plus table edges."""

from __future__ import annotations

import pytest

from txsms.core.segments import SegmentInfo, count_segments, is_gsm7

VECTORS = [
    # 1
    ("Hello world", "GSM-7", 11, 1),
    # 2
    ("a" * 160, "GSM-7", 160, 1),
    ("a" * 161, "GSM-7", 161, 2),
    # 3: extension characters cost two septets
    ("€" * 80, "GSM-7", 160, 1),
    ("€" * 81, "GSM-7", 162, 2),
    # 4: the escape pair cannot straddle a boundary, so 3 and not ceil(306/153) = 2
    ("a" * 152 + "€" + "a" * 152, "GSM-7", 306, 3),
    # 5
    ("It\u2019s here", "UCS-2", 9, 1),
    ("It's here", "GSM-7", 9, 1),
    # 6
    ("\u2014" * 70, "UCS-2", 70, 1),
    ("\u2014" * 71, "UCS-2", 71, 2),
    # 7: an emoji is a surrogate pair, two units
    ("a" * 68 + "\U0001f600", "UCS-2", 70, 1),
    ("a" * 69 + "\U0001f600", "UCS-2", 71, 2),
    # 8: the surrogate pair cannot straddle a boundary
    ("a" * 66 + "\U0001f600" + "a" * 66, "UCS-2", 134, 3),
    # 9: only capital C-cedilla is GSM
    ("\u00e7a va", "UCS-2", 5, 1),
    ("\u00c7a va", "GSM-7", 5, 1),
    # 10
    ("Price: 5€ [promo] {x}", "GSM-7", 26, 1),
    # 11
    ("", "GSM-7", 0, 0),
]


@pytest.mark.parametrize(("text", "encoding", "units", "segments"), VECTORS)
def test_reference_vectors(text: str, encoding: str, units: int, segments: int) -> None:
    assert count_segments(text) == SegmentInfo(encoding, units, segments)
    assert is_gsm7(text) is (encoding == "GSM-7")


@pytest.mark.parametrize(
    ("text", "units", "segments"),
    [
        ("a" * 306, 306, 2),  # exactly two full parts
        ("a" * 307, 307, 3),
        ("€" * 76 + "a" * 1, 153, 1),  # fits one single message
        ("a" * 153 + "€" * 4, 161, 2),
    ],
)
def test_gsm_boundaries(text: str, units: int, segments: int) -> None:
    info = count_segments(text)
    assert (info.encoding, info.units, info.segments) == ("GSM-7", units, segments)


def test_ucs2_part_boundaries() -> None:
    assert count_segments("\u2014" * 134).segments == 2
    assert count_segments("\u2014" * 135).segments == 3


@pytest.mark.parametrize("char", ["\u00a0", "\u202f", "\u2026", "\u201c", "`", "\u00e1", "\t"])
def test_common_non_gsm_characters_force_ucs2(char: str) -> None:
    assert not is_gsm7(f"Order {char}1001")
    assert count_segments(f"Order {char}1001").encoding == "UCS-2"


def test_whole_tables_are_gsm() -> None:
    basic = (
        "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
        "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
    )
    ext = "\f^{}\\[~]|€"
    assert len(set(basic)) + len(set(ext)) == 137  # set-equal to Twilio's map
    assert count_segments(basic) == SegmentInfo("GSM-7", 127, 1)
    assert count_segments(ext) == SegmentInfo("GSM-7", 20, 1)
    assert not is_gsm7("\x1b")  # the escape itself is not a character
