"""Where inputs and outputs live: local paths, or URLs that fsspec opens.

    prompts.jsonl, /data/x.parquet     local paths: the local code paths (append + fsync)
    file:///data/x.parquet             the same local path (the URL is only spelled differently)
    s3://bucket/key, gs://..., hf://...  an object store through fsspec (s3fs, gcsfs, ...)

Credentials and endpoints come from the environment, as each store's own tools read them: for
S3, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE / AWS_ENDPOINT_URL (MinIO, a local
S3); for any protocol, fsspec's FSSPEC_<PROTOCOL>_<OPTION> variables (FSSPEC_S3_ENDPOINT_URL=...)
or FSSPEC_<PROTOCOL>='{"option": ...}' reach the filesystem's constructor.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlparse

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")

# protocol -> what to install when fsspec cannot open it
_PACKAGES = {
    "s3": "s3fs (pip install 'tokenmill[s3]')",
    "s3a": "s3fs (pip install 'tokenmill[s3]')",
    "gs": "gcsfs (pip install gcsfs)",
    "gcs": "gcsfs (pip install gcsfs)",
    "az": "adlfs (pip install adlfs)",
    "abfs": "adlfs (pip install adlfs)",
    "abfss": "adlfs (pip install adlfs)",
    "hf": "huggingface_hub (pip install huggingface_hub)",
}


class StoreError(Exception):
    """A store cannot be reached or refused a request; the message says what to change."""


def protocol(spec: str) -> str | None:
    """The URL's scheme (`s3`), or None for a local path."""
    m = _URL.match(spec)
    return m.group(1).lower() if m else None


def is_url(spec: str) -> bool:
    """True for a store URL that is not a local file (file:// URLs are local paths)."""
    return protocol(spec) not in (None, "file", "local")


def local_spec(spec: str) -> str:
    """file:///data/x.jsonl -> /data/x.jsonl; anything else unchanged."""
    if protocol(spec) in ("file", "local"):
        parsed = urlparse(spec)
        return unquote(parsed.netloc + parsed.path) if parsed.netloc else unquote(parsed.path)
    return spec


def url_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`; StoreError when fsspec cannot open it."""
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - a dependency of tokenmill
        raise StoreError(f"{url} needs fsspec: pip install fsspec") from e
    proto = protocol(url) or "file"
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        package = _PACKAGES.get(proto, f"the fsspec implementation of {proto}://")
        raise StoreError(f"{url}: {proto}:// needs {package}") from e
    except ValueError as e:
        raise StoreError(
            f"{url}: fsspec does not know the protocol {proto}:// ({e}); use s3://, gs://, hf://, "
            "file:// or a local path"
        ) from e


def store_error(e: BaseException, url: str, action: str) -> StoreError:
    """A StoreError for a failed request on `url`, saying what to change."""
    cause = " ".join(f"{type(e).__name__}: {e}".split())
    text = str(e).lower()
    proto = protocol(url) or "file"
    s3 = proto in ("s3", "s3a")
    if "bucket does not exist" in text or "nosuchbucket" in text:
        hint = "the bucket does not exist: create it or fix the bucket name in the URL"
    elif isinstance(e, PermissionError) or any(
        word in text
        for word in ("accessdenied", "access denied", "forbidden", "invalidaccesskeyid",
                     "signaturedoesnotmatch", "invalid credentials", "unauthorized",
                     "unable to locate credentials", "nocredentials", "403")
    ):  # fmt: skip
        hint = (
            "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and "
            "the bucket's permissions"
            if s3
            else "access denied: check the credentials for this store and its permissions"
        )
    elif isinstance(e, FileNotFoundError):
        hint = "it does not exist: check the URL"
    elif any(word in text for word in ("connect", "timeout", "timed out", "name resolution")):
        hint = (
            "the store cannot be reached: check the network and AWS_ENDPOINT_URL"
            if s3
            else "the store cannot be reached: check the network and the endpoint"
        )
    else:
        hint = "check the URL, the credentials and the endpoint"
    return StoreError(f"cannot {action} {url} ({cause}); {hint}")


def join_url(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])
