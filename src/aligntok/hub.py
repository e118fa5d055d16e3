"""The Hugging Face Hub: finding saved models by hub id (offline from the cache), model cards, uploads.

* :func:`resolve_directory` turns ``ORG/NAME`` or ``ORG/NAME:SUBFOLDER`` into a local directory through
  huggingface_hub's snapshot download, which with ``HF_HUB_OFFLINE=1`` reads the local cache only;
  :func:`resolve_file` does the same for one file, ``ORG/NAME:PATH``.
* :func:`model_card` writes a README.md whose YAML front matter is what the Hub reads (library_name,
  license, tags, datasets, base_model, model-index metrics), through huggingface_hub's ``ModelCardData``.
* :func:`upload_directory` creates the repository (if needed) and uploads a folder in one commit.

What to put in a card for each kind of model, and ``push_to_hub`` itself, live in :mod:`aligntok.publish`
(this module imports no aligntok model, so the models can import it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LIBRARY_NAME = "aligntok"
DEFAULT_LICENSE = "apache-2.0"  #: aligntok's own license; pass the one that the weights' sources allow
CARD_NAME = "README.md"


def split_hub_source(name: str) -> tuple[str, str | None]:
    """``ORG/NAME:SUBFOLDER`` -> (``ORG/NAME``, ``SUBFOLDER``); a plain hub id -> (id, None).

    Hub ids cannot contain ':', so the colon names a folder inside the repository (e.g. a pipeline's ``vae``).
    """
    repo_id, colon, subfolder = name.partition(":")
    return repo_id, (subfolder.strip("/") or None) if colon else None


def resolve_directory(name: str, *, what: str, error: type[Exception] = FileNotFoundError) -> Path:
    """A local directory as is; a hub id ``ORG/NAME[:SUBFOLDER]`` through huggingface_hub (or its cache).

    Offline (``HF_HUB_OFFLINE=1``) only the local Hugging Face cache is read. Raises ``error`` with a
    one-line message naming ``what`` was looked for when neither works.
    """
    from aligntok.models.encoders import looks_like_local_path

    local = Path(name).expanduser()
    if local.is_dir():
        return local
    repo_id, subfolder = split_hub_source(name)
    if looks_like_local_path(repo_id):
        raise error(f"{what} directory '{name}' does not exist")
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id=repo_id, allow_patterns=[f"{subfolder}/*"] if subfolder else None))
    except (OSError, ValueError):
        raise error(
            f"{what} '{name}' is neither a local directory nor downloadable (offline?): on a machine with "
            f"internet run `hf download {repo_id}` and copy the Hugging Face cache here, or pass a local directory"
        ) from None
    directory = root / subfolder if subfolder else root
    if not directory.is_dir():
        raise error(f"hub repository '{repo_id}' has no folder '{subfolder}'")
    return directory


def resolve_file(name: str, *, what: str, error: type[Exception] = FileNotFoundError) -> Path:
    """A local file as is; ``ORG/NAME:PATH`` (a file in a hub repository) through huggingface_hub (or its cache).

    Raises ``error`` with a one-line message naming ``what`` when neither works (offline: the cache only).
    """
    from aligntok.models.encoders import looks_like_local_path

    local = Path(name).expanduser()
    if local.is_file():
        return local
    repo_id, filename = split_hub_source(name)
    if looks_like_local_path(repo_id) or filename is None:
        raise error(f"{what} '{name}' is not a file (a hub file is named ORG/NAME:PATH)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except (OSError, ValueError, EntryNotFoundError):  # a missing file is no OSError in huggingface_hub 1.x
        raise error(
            f"{what} '{name}' is neither a local file nor downloadable (offline?): on a machine with internet run "
            f"`hf download {repo_id} {filename}` and copy the Hugging Face cache here, or pass a local file"
        ) from None


def model_card(
    body: str,
    *,
    tags: Sequence[str],
    license: str | None = DEFAULT_LICENSE,
    datasets: Sequence[str] = (),
    base_model: str | Sequence[str] | None = None,
    eval_results: Sequence[Any] = (),
    model_name: str | None = None,
    library_name: str = LIBRARY_NAME,
) -> str:
    """README.md text: YAML front matter the Hub reads (``library_name``, aligntok by default, and the given
    fields), then ``body``.

    ``eval_results``: huggingface_hub ``EvalResult``s, written as the card's ``model-index`` (they need
    ``model_name``).
    """
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name=library_name, license=license, tags=list(dict.fromkeys(tags)), datasets=list(datasets) or None,
        base_model=base_model or None, eval_results=list(eval_results) or None,
        model_name=model_name if eval_results else None,
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


def card_body(text: str) -> str:
    """A README.md without its YAML front matter."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return text[end + 4 :].lstrip("\n")
    return text


def upload_directory(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with aligntok",
) -> str:
    """Create ``repo_id`` (a model repository) if it does not exist and upload ``directory`` as one commit.

    Returns the commit's URL. Authentication and HTTP errors come from huggingface_hub (OSErrors); a Hub that
    cannot be reached (no network, DNS) raises ConnectionError, also an OSError, in one line.
    """
    from huggingface_hub import HfApi, errors

    transport_error = getattr(errors, "HTTPError", ())  # its HTTP client's base error (httpx's ConnectError, ...)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=commit_message)
    except OSError:
        raise
    except transport_error as e:
        raise ConnectionError(f"cannot reach the Hugging Face Hub to push {repo_id}: {e}") from e
    return str(getattr(info, "commit_url", info))
