"""What the connectors' commands share: which configured shop or store a command is about,
where this receiver listens, and posting a simulated delivery to it.

Kept apart from base.py on purpose: base.py is the receiver's contract, imported on the
request path by `webhooks/platforms.py`; these helpers need click and requests and run only
from `txsms install|simulate|reconcile <platform>`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import requests

from txsms.core.config import Config

#: The flags every `txsms install <platform>` takes, worded once.
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Show what would change; change nothing."
)
uninstall_option = click.option(
    "--uninstall", is_flag=True, help="Delete this receiver's webhooks instead."
)


def pick_account(
    config: Config,
    table: str,
    wanted: str | None,
    *,
    field: str,
    key: Callable[[str], str],
    option: str,
) -> dict[str, Any]:
    """The `[[table]]` entry ("shopify.shops") whose `field` matches `wanted` once both are
    normalised by `key` (a domain's case, a URL's scheme or slash do not matter); without
    `wanted`, the only entry. `option` ("--shop DOMAIN") is what the user should pass."""
    platform, _, name = table.partition(".")
    entries: list[dict[str, Any]] = getattr(config, platform).get(name, [])
    if wanted is not None:
        for entry in entries:
            if key(entry[field]) == key(wanted):
                return entry
        raise click.UsageError(f"{wanted} is not one of the [[{table}]] in {config.path}")
    if len(entries) == 1:
        return entries[0]
    if not entries:
        raise click.UsageError(f"{config.path} has no [[{table}]]; see the README")
    raise click.UsageError(f"several {name} are configured: pass {option}")


def local_url(config: Config, platform: str) -> str:
    """This config's own receiver of `platform`, as a command on the same machine reaches
    it: a wildcard bind address is not something to connect to, 127.0.0.1 is."""
    host = config.server.host if config.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{config.server.port}/webhooks/{platform}"


def post_delivery(
    url: str, body: bytes, headers: dict[str, str], *, timeout: float
) -> requests.Response:
    """POST a simulated delivery; any answer is returned (the caller prints it), none at all
    is a ClickException naming the usual cause."""
    try:
        return requests.post(url, data=body, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise click.ClickException(
            f"no answer from {url} (is `txsms serve` running?): {exc}"
        ) from None
