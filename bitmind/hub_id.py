"""Hugging Face hub ids: one rule for detector weights, diffusion models and real-image datasets.

`org/name` is checked with huggingface_hub's own repo-id validation (characters, length, no `--`/`..`), so an id
we accept is one the hub client accepts; a bare name or a path with more parts is not a hub id here, since every
caller must tell a hub id from a local file or a built-in name.
"""

import re

__all__ = ["is_hub_id", "parse_hub_ref"]

_REVISION = re.compile(r"[\w./-]{1,128}")


def is_hub_id(text: object) -> bool:
    """Whether `text` is exactly `org/name` as the hub accepts it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # noqa: PLC0415 - keep imports light

    if not isinstance(text, str) or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def parse_hub_ref(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of `org/name[@revision]` (a branch, tag or commit); None when `text` is not one."""
    repo, at, revision = text.partition("@")
    if not is_hub_id(repo) or (at and not _REVISION.fullmatch(revision)):
        return None
    return repo, revision if at else None
