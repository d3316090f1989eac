"""Hugging Face Hub ids (``org/name`` or ``org/name@revision``) as BASE or ADAPTER.

A Hub id is resolved to a folder in huggingface_hub's local cache, downloading
only the files a merge needs when that is allowed. Local paths win: an
existing folder named like a Hub id is used as it is.
"""

from __future__ import annotations

import os
import re

from ..errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")

# What a merge reads or copies into its output: configs, weights, tokenizer files.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "adapter_model.bin",
    "tokenizer*",
    "*.model",
    "*.txt",
    "*.jinja",
]

_TRUE = {"1", "on", "yes", "true"}


def is_hub_id(ref: str) -> bool:
    return bool(HUB_ID.match(ref))


def hub_id_of(folder: str | os.PathLike) -> str | None:
    """The Hub id of a snapshot folder in huggingface_hub's cache, else None.

    The cache keeps ``org/name`` as ``models--org--name/snapshots/<revision>/``;
    the id is read back from that layout, so it is known however the folder was found.
    """
    parts = os.path.normpath(os.fspath(folder)).split(os.sep)
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    org_name = parts[-3][len("models--") :].split("--")
    return "/".join(org_name) if all(org_name) and len(org_name) >= 2 else None


def _offline_default() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve(ref: str | os.PathLike, *, offline: bool | None = None) -> str:
    """A local folder for ``ref``: a local path as it is, or a Hub id's cached snapshot.

    Looks in the local Hub cache first (works offline); downloads the merge's
    files when not cached, unless ``offline`` (default: the HF_HUB_OFFLINE
    environment variable). Anything else comes back unchanged, for later code
    to report.
    """
    ref = os.fspath(ref)
    if os.path.exists(ref) or not is_hub_id(ref):
        return ref
    repo_id, _, revision = ref.partition("@")
    revision = revision or None
    if offline is None:
        offline = _offline_default()
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - a runtime dependency
        raise InputError(
            f"{ref} is not a local folder, and huggingface_hub (needed for Hub ids) is not installed.",
            hint="Install it with `pip install huggingface_hub`, or give a local folder.",
        ) from None
    kwargs = dict(
        repo_id=repo_id,
        revision=revision,
        allow_patterns=ALLOW_PATTERNS,
        cache_dir=os.environ.get("HF_HUB_CACHE") or None,
    )
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        return huggingface_hub.snapshot_download(**kwargs, local_files_only=True)
    except hf_errors.LocalEntryNotFoundError:
        pass  # not cached (or only partly): download it below, if allowed
    except hf_errors.HFValidationError as e:
        raise InputError(f"{ref} is neither a local folder nor a valid Hub id ({e}).") from None
    if offline:
        raise InputError(
            f"{ref} is not a local folder, and Hub model {ref} is not in the local cache "
            "while offline.",
            hint=f"Run `{download}` first, or drop --offline / unset HF_HUB_OFFLINE to download it.",
        )
    try:
        return huggingface_hub.snapshot_download(**kwargs)
    except hf_errors.GatedRepoError:
        raise InputError(
            f"Hub model {repo_id} is gated: you need to accept its terms and be logged in.",
            hint=f"Accept the terms on https://huggingface.co/{repo_id}, then run "
            "`hf auth login` (or set HF_TOKEN).",
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise InputError(
            f"{ref} is not a local folder, and Hub model {repo_id} does not exist (or is private).",
            hint="Check the path or id; for a private model run `hf auth login` (or set HF_TOKEN).",
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise InputError(
            f"Hub model {repo_id} has no revision {revision!r}.",
            hint="Give a branch, tag or commit hash that exists.",
        ) from None
    except hf_errors.LocalEntryNotFoundError as e:
        raise InputError(
            f"cannot download Hub model {ref}, and it is not in the local cache ({e}).",
            hint=f"Check the network connection, or run `{download}` where the Hub is reachable.",
        ) from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise InputError(
            f"cannot download Hub model {ref}: {e}.",
            hint=f"Check the network connection and disk space, or run `{download}`.",
        ) from None
