"""The pipeline's last step: tell a running server that the champion may have changed."""

from __future__ import annotations

import logging
from typing import Any

from core.settings import Settings

log = logging.getLogger(__name__)


def notify_serving(settings: Settings, promoted: dict[str, Any]) -> dict[str, Any]:
    """POST /admin/reload to the configured server when a new champion was promoted.

    A server that is not running is not an error: it loads the champion when it starts.

    Returns:
        {"notified": bool, "detail": str}
    """
    import httpx

    if not promoted.get("promoted"):
        return {"notified": False, "detail": "champion unchanged"}
    if not settings.serving_url:
        return {"notified": False,
                "detail": "SHOPREC_SERVING_URL not set; servers load the champion at start"}
    try:
        response = httpx.post(f"{settings.serving_url.rstrip('/')}/admin/reload",
                              headers={"Authorization": f"Bearer {settings.admin_token}"},
                              timeout=120)
    except httpx.HTTPError as exc:
        log.warning("serving at %s not reachable: %s", settings.serving_url, exc)
        return {"notified": False, "detail": f"not reachable: {exc}"}
    if response.status_code >= 400:
        raise RuntimeError(f"reload refused by {settings.serving_url}: "
                           f"{response.status_code} {response.text[:200]}")
    return {"notified": True, "detail": response.json()}
