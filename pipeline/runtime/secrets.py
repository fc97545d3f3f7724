"""Settings that must stay off command lines (/proc/<pid>/cmdline is readable by every user):
the launcher hands them to its servers in the environment, and never prints them."""

from __future__ import annotations

import json
import os
from typing import Any

SECRET_KEYS = ("language.api_key",)
SECRET_SETTINGS_ENV = "DVD_SECRET_SETTINGS"  # launcher -> server: JSON {dotted key: value}
API_KEY_ENV = "DVD_API_KEY"  # what `dvd chat` and the printed commands read the API key from


def split_secrets(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings that may go on a command line, secret ones)."""
    public = {key: value for key, value in overrides.items() if key not in SECRET_KEYS}
    secret = {key: value for key, value in overrides.items() if key in SECRET_KEYS}
    return public, secret


def secret_env(secret: dict[str, Any]) -> dict[str, str]:
    """The environment entry that carries `secret` settings to a server (none when there are none)."""
    return {SECRET_SETTINGS_ENV: json.dumps(secret)} if secret else {}


def take_secrets() -> dict[str, Any]:
    """The secret settings our launcher passed (secret_env), removed from our environment so that
    processes we start do not inherit them."""
    raw = os.environ.pop(SECRET_SETTINGS_ENV, "")
    if not raw:
        return {}
    settings = json.loads(raw)
    return {key: value for key, value in settings.items() if key in SECRET_KEYS}
