"""Files that come from elsewhere stay inside the place they were given in: checks that run
before anything is read or extracted. (A checkpoint's pickles are read as data by
megatron_apex.checkpoint.safety.)

Tar members with absolute paths or `..` components are refused by `safe_member_name`; shards
are read in memory, never extracted, but the name is still a sign of a hostile file.
`link_escape` tells when a file inside an input folder leads out of it (a symbolic or hard link).
"""

from __future__ import annotations

import os
import posixpath
from typing import Optional


def safe_member_name(name: str, archive: str) -> str:
    """A tar member's name if it stays inside the archive's directory, else ValueError."""
    normalized = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or posixpath.isabs(normalized) or normalized == ".." \
            or normalized.startswith("../") or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"{archive}: member '{name}' points outside the archive (absolute or '..' path)")
    return normalized


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def link_escape(path: str, root: str) -> Optional[str]:
    """Why the file ``path`` inside the input folder ``root`` would lead outside it, or None.

    A symbolic link (anywhere on the path below ``root``) that resolves outside ``root`` leads
    out; one into a Hugging Face cache's own ``blobs/`` (``root`` being ``<repo>/snapshots/<rev>``)
    does not. A regular file with more than one hard link may be a second name of any file on
    the disk: there is no telling where its other names are, so it leads out too."""
    real_root = os.path.realpath(root)
    allowed = [real_root]
    if os.path.basename(os.path.dirname(real_root)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(real_root)), "blobs"))
    real = os.path.realpath(path)
    if not any(_within(real, a) for a in allowed):
        return f"a symbolic link to {real}, outside {root}"
    try:
        st = os.stat(real)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if os.path.isfile(real) and st.st_nlink > 1:
        return f"a hard link ({st.st_nlink} names; its other names may lie outside {root})"
    return None
