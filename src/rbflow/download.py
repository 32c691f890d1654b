"""Downloads from web services, cached on disk with their URL and checksum.

Every file fetched is kept under a cache folder, named from its URL (or a name the caller
gives), and listed in the folder's ``index.json`` with its URL, size and sha256. A later request
for the same URL is answered from the cache without touching the network. A file put in the
folder by hand, under the name an error message gives, is taken as is (and indexed), so that a
machine without network can be served by copying the files over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rbflow.errors import InputError
from rbflow.io import atomic_path, file_sha256, write_json

__all__ = ["fetch", "cache_name", "cached_fetch", "INDEX"]

log = logging.getLogger(__name__)

#: Name of the index of a cache folder.
INDEX = "index.json"


def fetch(url: str, *, timeout: float = 60.0, what: str = "file") -> bytes:
    """GET ``url`` and return the body; a failure raises a clear :class:`InputError`.

    Parameters
    ----------
    url : str
        Address to fetch.
    timeout : float, optional
        Seconds to wait for the connection and for each read.
    what : str, optional
        What is fetched, for the messages (e.g. ``"PS1 cutout"``).

    Returns
    -------
    bytes
        The body (never empty).

    Raises
    ------
    InputError
        HTTP error status, timeout, unreachable host or an empty answer.
    """
    log.info("fetching %s: %s", what, url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - configured service URLs
            body = response.read()
    except urllib.error.HTTPError as exc:
        exc.close()  # the error holds the open response
        raise InputError(f"{what}: the service answered HTTP {exc.code} ({exc.reason}) for {url}") from None
    except TimeoutError:
        raise InputError(f"{what}: no answer within {timeout:g} s from {url}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise InputError(f"{what}: no answer within {timeout:g} s from {url}") from None
        raise InputError(f"{what}: cannot reach {url} ({exc.reason})") from None
    if not body:
        raise InputError(f"{what}: the service gave an empty answer for {url}")
    return body


def cache_name(url: str, *, suffix: str = "") -> str:
    """File name of ``url`` in a cache folder: a readable stem and 12 hex digits of its sha256."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("?")[-1] if "?" in url else url.rsplit("/", 1)[-1])[:60]
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"{stem.strip('_') or 'file'}_{digest}{suffix}"


def _read_index(cache: Path) -> dict[str, Any]:
    path = cache / INDEX
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cache index '{path}' is unreadable ({exc}): delete it (it is rebuilt) and rerun") from None


def cached_fetch(
    url: str,
    cache: str | os.PathLike,
    *,
    name: str | None = None,
    timeout: float = 60.0,
    what: str = "file",
) -> Path:
    """The cached copy of ``url``, downloaded (atomically, indexed) when the cache lacks it.

    Parameters
    ----------
    url : str
        Address of the file.
    cache : path-like
        Cache folder (created when missing).
    name : str, optional
        File name in the cache (default :func:`cache_name` of the URL).
    timeout : float, optional
        Seconds to wait for the service.
    what : str, optional
        What is fetched, for the messages.

    Returns
    -------
    pathlib.Path
        The cached file.

    Raises
    ------
    InputError
        The download failed (the message names the URL, the cache folder and the file to put
        there by hand; nothing already in the cache is lost), or a cached file no longer matches
        its recorded checksum.
    """
    cache = Path(cache)
    name = name or cache_name(url)
    path = cache / name
    index = _read_index(cache)
    entry = index.get(url)
    if path.exists() and entry is not None and entry.get("file") == name:
        if file_sha256(path) != entry.get("sha256"):
            raise InputError(
                f"{what}: the cached file '{path}' no longer matches the sha256 recorded in '{cache / INDEX}' for {url}: "
                "delete the file (it is downloaded again) and rerun"
            )
        return path
    if not path.exists():
        try:
            body = fetch(url, timeout=timeout, what=what)
        except InputError as exc:
            raise InputError(
                f"{exc}. Without network, download {url} by hand and save it as '{path}' "
                f"(cache folder '{cache}'), then rerun"
            ) from None
        with atomic_path(path) as tmp:
            tmp.write_bytes(body)
    else:
        log.info("%s: taking '%s' found in the cache folder for %s", what, path, url)
    index = _read_index(cache)  # another job may have added entries meanwhile
    index[url] = {"file": name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    write_json(index, cache / INDEX)
    return path
