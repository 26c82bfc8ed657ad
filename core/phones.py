"""Phone numbers: parse, validate, format, and find the number's time zones."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType
from phonenumbers import timezone as pn_timezone

# More zones than this means the prefix tells us nothing useful (toll-free +1 800 gives ~40;
# +44 7911 gives four that share one clock, so the cut-off is not lower).
MAX_USEFUL_ZONES = 6


@dataclass(frozen=True)
class Phone:
    e164: str
    region: str | None
    zones: tuple[str, ...]  # empty: unknown, use the sender's zone
    kind: str  # "mobile", "fixed_line", "fixed_line_or_mobile", "toll_free", ...


class PhoneError(ValueError):
    def __init__(self, reason: str):
        self.reason = reason  # "no_phone" | "invalid_phone" | "landline"
        super().__init__(reason)


_KINDS = {
    PhoneNumberType.MOBILE: "mobile",
    PhoneNumberType.FIXED_LINE: "fixed_line",
    PhoneNumberType.FIXED_LINE_OR_MOBILE: "fixed_line_or_mobile",
    PhoneNumberType.TOLL_FREE: "toll_free",
    PhoneNumberType.VOIP: "voip",
    PhoneNumberType.PERSONAL_NUMBER: "personal",
    PhoneNumberType.PAGER: "pager",
}


def normalize(raw: str | None, default_region: str, country_hint: str | None = None) -> Phone:
    """Parse `raw` the way a person typed it; the event's country hint beats the sender's region.

    Raises PhoneError("no_phone") for nothing to parse, ("invalid_phone") for what is not a
    valid number, and ("landline") for a number that cannot receive SMS by its metadata.
    """
    if raw is None or not str(raw).strip():
        raise PhoneError("no_phone")
    region = (country_hint or default_region or "").upper() or None
    parsed = _parse(str(raw), region)
    if isinstance(parsed, str):
        raise PhoneError(parsed)
    return parsed


#: Numbers whose parse is kept: as many as the numbers a process keeps as familiar
#: (`pipeline.FAMILIAR_NUMBERS`), whose blind index is worked out from the parsed number, so a
#: familiar number costs no parse (32 µs; about 400 bytes an entry, 4 MB when full).
PARSED_NUMBERS = 10_000


# A webhook's number is parsed twice (the connector checks it is usable, the pipeline parses
# it for good) and a shop's customers come back with their next order, and each order with
# its payment, fulfilment and delivery. Process memory only.
@functools.lru_cache(maxsize=PARSED_NUMBERS)
def _parse(raw: str, region: str | None) -> Phone | str:
    """The Phone, or the reason it is not one."""
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return "invalid_phone"
    # number_type is UNKNOWN exactly when is_valid_number is False (it matches the same
    # patterns); asking for the type alone halves the work, which is most of a request's.
    number_type = phonenumbers.number_type(number)
    if number_type == PhoneNumberType.UNKNOWN:
        return "invalid_phone"
    kind = _KINDS.get(number_type, "other")
    if kind == "fixed_line":  # only where metadata is sure; NANP says "fixed_line_or_mobile"
        return "landline"
    # time_zones_for_number would work the type out a second time; we know it.
    if phonenumbers.is_number_type_geographical(number_type, number.country_code):
        found = pn_timezone.time_zones_for_geographical_number(number)
    else:
        found = pn_timezone.time_zones_for_number(number)  # the country's zones
    zones = tuple(z for z in found if z != "Etc/Unknown")
    if len(zones) > MAX_USEFUL_ZONES or kind == "toll_free":
        zones = ()
    return Phone(
        e164=phonenumbers.format_number(number, PhoneNumberFormat.E164),
        region=phonenumbers.region_code_for_number(number),
        zones=zones,
        kind=kind,
    )
