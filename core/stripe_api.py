"""Stripe's API, behind one small adapter: re-read an object when STRIPE_API_KEY is set.

Webhook events alone decide a subscription's state (``workers.stripe_effects``); with an API
key, the object as Stripe holds it now is read after the events and wins. An outage (no
connection, rate limit, a 5xx) is ``StripeUnavailable``, a temporary error the actor retries;
any other refusal (unknown object, bad key) leaves the decision to the events.
"""

from __future__ import annotations

import functools
from typing import Any

import stripe

from core.log import get_logger
from core.settings import Settings

log = get_logger(__name__)
TIMEOUT_S = 5  # the caller holds a transaction and a per-subscription lock meanwhile


class StripeUnavailable(Exception):
    """Stripe's API could not answer now: retry later."""


@functools.cache
def _client(api_key: str, api_base: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base},
        max_network_retries=0,  # the actor's retries are the retries
        http_client=stripe.RequestsClient(timeout=TIMEOUT_S),
    )


def fetch_subscription(settings: Settings, subscription_id: str) -> dict[str, Any] | None:
    """The subscription as Stripe holds it now, or None without an API key or when Stripe
    refuses the request for a reason retrying cannot change."""
    if not settings.stripe_api_key:
        return None
    client = _client(settings.stripe_api_key, settings.stripe_api_base)
    try:
        obj = client.v1.subscriptions.retrieve(subscription_id)
    except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
        raise StripeUnavailable(f"Stripe API: {type(exc).__name__}") from None
    except stripe.StripeError as exc:
        log.warning(
            "stripe_api_refused",
            object_id=subscription_id,
            error=type(exc).__name__,
            status=exc.http_status,
        )
        return None
    return obj.to_dict()
