"""Finding checkpoint files: a local folder, or a Hugging Face Hub repo id through `huggingface_hub`.

Hub downloads go through `hf_hub_download`, so the usual cache (`HF_HUB_CACHE` / `HF_HOME`), revisions and offline
mode (`HF_HUB_OFFLINE=1`, which serves files from the cache only) all behave as in transformers.
"""

from __future__ import annotations

import os


class ModelNotFoundError(FileNotFoundError):
    """No checkpoint file could be found for the given name, path or revision."""


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_file(name_or_path: str | os.PathLike, filename: str, revision: str | None = None,
                 required: bool = True) -> str | None:
    """Local path of `filename` from a folder or a Hub repo (downloaded into the cache if needed).

    Returns None when `required` is False and the repo or folder exists but has no such file.
    Raises `ModelNotFoundError` with a one-line reason otherwise.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        candidate = os.path.join(name, filename)
        if os.path.isfile(candidate):
            return candidate
        if required:
            raise ModelNotFoundError(f"{name}: folder has no {filename}")
        return None
    if os.path.exists(name):
        raise ModelNotFoundError(f"{name}: expected a folder or a Hub repo id, found a file")
    if not _looks_like_repo_id(name):
        raise ModelNotFoundError(f"{name}: no such folder, and not a valid Hub repo id")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(name, filename, revision=revision)
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{name}: no such model repo on the Hub (or it is private)") from None
    # LocalEntryNotFoundError subclasses EntryNotFoundError in recent huggingface_hub: catch it first
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{name}: revision {revision!r} not found on the Hub") from None
    except LocalEntryNotFoundError:
        if required:
            raise ModelNotFoundError(
                f"{name}: {filename} is not in the local Hub cache and the Hub cannot be reached "
                "(offline, or HF_HUB_OFFLINE=1)"
            ) from None
        return None
    except EntryNotFoundError:
        if required:
            raise ModelNotFoundError(f"{name}: repo has no file {filename}") from None
        return None
    except (HfHubHTTPError, OSError) as err:
        raise ModelNotFoundError(f"{name}: could not fetch {filename} ({type(err).__name__}: {err})") from None
