"""Minor units: what an integer ``amount`` in a Stripe object means in its currency.

The exponent of each ISO 4217 currency comes from CLDR through babel (a maintained source, not a
table of our own). Stripe's API departs from ISO in documented places, and those win:
- zero-decimal in Stripe's API (https://docs.stripe.com/currencies#zero-decimal), which for
  UGX differs from ISO's 2;
- three-decimal BHD, JOD, KWD, OMR, TND (ISO agrees; listed so a CLDR change cannot move them);
- ISK, HUF and TWD stay two-decimal in Stripe's API for backwards compatibility (amounts are
  multiples of 100), although ISO/CLDR give ISK 0 and the cash units of HUF and TWD are whole.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache

from babel.core import Locale
from babel.numbers import get_currency_precision

STRIPE_ZERO_DECIMAL = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)
STRIPE_THREE_DECIMAL = frozenset(["BHD", "JOD", "KWD", "OMR", "TND"])
STRIPE_TWO_DECIMAL_IN_API = frozenset(["ISK", "HUF", "TWD"])


class UnknownCurrency(ValueError):
    """Not an ISO 4217 code that babel knows: the amount cannot be read."""


@lru_cache(maxsize=1)
def _known() -> frozenset[str]:
    return frozenset(Locale("en").currencies)


@lru_cache(maxsize=512)
def exponent(currency: str) -> int:
    """Digits after the decimal point of an amount in `currency` as Stripe's API counts them."""
    code = currency.upper() if isinstance(currency, str) else ""
    if len(code) != 3 or not code.isascii() or not code.isalpha() or code not in _known():
        raise UnknownCurrency(f"unknown currency {str(currency)[:16]!r}")
    if code in STRIPE_ZERO_DECIMAL:
        return 0
    if code in STRIPE_THREE_DECIMAL:
        return 3
    if code in STRIPE_TWO_DECIMAL_IN_API:
        return 2
    return int(get_currency_precision(code))


def from_minor(minor: int, currency: str) -> Decimal:
    """``5120, "kwd"`` -> ``Decimal("5.120")``; ``500, "jpy"`` -> ``Decimal("500")``."""
    return Decimal(minor).scaleb(-exponent(currency))
