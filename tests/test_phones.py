"""Phone numbers as a person typed them: E.164, region, kind, time zones, or the reason not."""

from __future__ import annotations

import phonenumbers
import pytest
from phonenumbers import timezone as pn_timezone

from txsms.core import phones
from txsms.core.phones import PhoneError, normalize

LONDON = ("Europe/Guernsey", "Europe/Isle_of_Man", "Europe/Jersey", "Europe/London")


@pytest.mark.parametrize(
    ("raw", "region", "e164", "kind", "zones"),
    [
        ("+1 415 555 0100", "US", "+14155550100", "fixed_line_or_mobile", ("America/Los_Angeles",)),
        ("(212) 555-0100", "US", "+12125550100", "fixed_line_or_mobile", ("America/New_York",)),
        ("+44 7911 123456", "US", "+447911123456", "mobile", LONDON),
        ("0412 345 678", "AU", "+61412345678", "mobile", ()),  # mobile: all of Australia's
        ("+1 800 555 0100", "US", "+18005550100", "toll_free", ()),  # toll-free: anywhere
        # VoIP is not geographical: the country's zones, not a prefix's.
        ("+33 9 51 23 45 67", "US", "+33951234567", "voip", ("Europe/Paris",)),
        ("+44 56 1234 5678", "US", "+445612345678", "voip", LONDON),
    ],
)
def test_numbers_parse_with_their_zones(raw, region, e164, kind, zones):
    phone = normalize(raw, region)
    assert (phone.e164, phone.kind, phone.zones) == (e164, kind, zones)
    # The same zones the library finds when it works the number's type out itself.
    number = phonenumbers.parse(raw, region)
    full = tuple(z for z in pn_timezone.time_zones_for_number(number) if z != "Etc/Unknown")
    assert phone.zones == (full if len(full) <= 6 and kind != "toll_free" else ())


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "no_phone"),
        ("  ", "no_phone"),
        ("call me", "invalid_phone"),
        ("+1 212 555 01", "invalid_phone"),
        ("+44 20 7946 0958", "landline"),
    ],
)
def test_unusable_numbers_say_why(raw, reason):
    with pytest.raises(PhoneError) as err:
        normalize(raw, "US")
    assert err.value.reason == reason


def test_the_events_country_beats_the_senders_region():
    assert normalize("0412 345 678", "US", "au").e164 == "+61412345678"


def test_numbers_met_again_are_not_parsed_again():
    """The parse is kept for as many numbers as a process keeps familiar (whose blind index
    comes from the parsed number): meeting 2,000 customers again parses none of them."""
    from txsms.core.pipeline import FAMILIAR_NUMBERS

    assert phones.PARSED_NUMBERS >= FAMILIAR_NUMBERS
    areas = ["415", "212", "312", "617", "206", "303", "512", "702", "404", "503"]
    areas += ["213", "305", "713", "602", "215", "619", "210", "214", "408", "904"]
    raw = [f"+1 {a} 555 01{i:02d}" for a in areas for i in range(100)]
    phones._parse.cache_clear()
    first = [phones.normalize(number, "US") for number in raw]
    misses = phones._parse.cache_info().misses
    assert misses == len(raw) == 2000
    assert [phones.normalize(number, "US") for number in raw] == first
    assert phones._parse.cache_info().misses == misses
