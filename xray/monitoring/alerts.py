"""Alerts out: one line posted to the on-call channel's webhook (Slack, Teams and most chat webhooks take
``{"text": ...}``), from $XRAY_ALERT_WEBHOOK or a URL given. The monitoring, feedback and estimate steps post their
headline when a check fails; the DICOM node posts an urgent study. Standard library only: the node's triage imports it,
and so do the node's build processes, which draw no plot and should import nothing else."""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

WEBHOOK_ENV = "XRAY_ALERT_WEBHOOK"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, request, fp, code, msg, headers, new_url):
        raise urllib.error.HTTPError(
            request.full_url, code, f"redirect to {urlsplit(new_url).hostname} refused", headers, fp
        )


def post_alert(line: str, url: str | None = None, timeout_s: float = 10.0) -> bool:
    """POST ``{"text": line}`` (what Slack, Teams and most chat webhooks take) to ``url`` or $XRAY_ALERT_WEBHOOK: an
    http(s) URL only, no redirect followed, ``timeout_s`` at most. False when none is set; a webhook that fails is one
    logged error naming its host, never its path or token."""
    url = url or os.environ.get(WEBHOOK_ENV)
    if not url:
        return False
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        logger.error("alert not posted: %s must be an http:// or https:// URL (scheme %r)", WEBHOOK_ENV, parts.scheme)
        return False
    request = urllib.request.Request(
        url, data=json.dumps({"text": line}).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout_s) as response:
            response.read()
        return True
    except OSError as error:
        reason = getattr(error, "msg", "") if isinstance(error, urllib.error.HTTPError) else ""
        logger.error(
            "alert not posted to the webhook at %s: %s%s",
            parts.hostname,
            type(error).__name__,
            f" ({reason})" * bool(reason),
        )
        return False
