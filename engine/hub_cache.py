"""Hub ids (`Qwen/Qwen3-0.6B`) resolved from the local Hugging Face cache, never from the network.

The cache is the one huggingface_hub writes -- `models--ORG--NAME/snapshots/<commit>/`, with
`refs/main` naming the commit -- found where huggingface_hub looks for it: `$HF_HUB_CACHE`, else
`$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. The
environment is read when a model is loaded (not when this module is imported).
"""
from __future__ import annotations

import os
import re

# huggingface_hub's repo id shape: an optional namespace, a name; word characters, '-' and '.'.
_REPO_ID = re.compile(r"(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}")


def looks_like_hub_id(spec: str) -> bool:
    """`ORG/NAME` or `NAME` as the Hub spells repo ids (not a path: no leading '.', '/', no '..' or '--')."""
    return (bool(_REPO_ID.fullmatch(spec)) and not spec.startswith((".", "-")) and ".." not in spec
            and "--" not in spec and not spec.endswith((".", "-")))


def hub_cache_dir() -> str:
    """The Hugging Face hub cache directory, by huggingface_hub's precedence of environment variables."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(os.path.expandvars(explicit))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(os.path.expandvars(home)), "hub")


def cached_snapshot(repo_id: str) -> str | None:
    """The directory of `repo_id`'s cached `main` snapshot, or None when it is not cached (no network use)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
    return path if os.path.isdir(path) else None
