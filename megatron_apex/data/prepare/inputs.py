"""The inputs of tools/prepare_data.py: listing them (folders, tar files, jsonl lists, each kept
inside its own folder; module docstring of megatron_apex/data/prepare) and reading one input's
image bytes and caption."""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_apex.untrusted import link_escape, safe_member_name

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
CAPTION_EXTS = (".txt", ".json")  # sidecar captions: plain text, or {"caption": ...} (.txt wins)


@dataclass(frozen=True)
class InputItem:
    name: str                             # what summaries and sample json call it
    path: str                             # image file, or the tar holding it
    member: str = ""                      # tar member name ("" = a plain file)
    caption: Optional[str] = None         # from a jsonl
    caption_path: Optional[str] = None    # sidecar .txt/.json file, or the tar holding it
    caption_member: str = ""


# ------------------------------------------------------------------------------ listing

def _tar_items(tar_path: Path) -> tuple[list[InputItem], list[dict]]:
    """The images of a tar file; a truncated tar keeps the members before the damage."""
    members, skipped = [], []
    try:
        with tarfile.open(tar_path) as tar:
            while (member := tar.next()) is not None:
                members.append(member)
    except (tarfile.TarError, OSError, EOFError) as exc:
        if not members:
            raise ValueError(f"--input {tar_path}: not a readable tar file ({exc})") from None
        skipped.append(dict(input=str(tar_path), reason=f"damaged tar after {len(members)} members "
                                                        f"({type(exc).__name__}); the members before it are used"))
    files = {}
    for m in members:
        safe_member_name(m.name, str(tar_path))  # a hostile name refuses the whole archive
        if m.isfile():
            files[m.name] = m
        elif m.issym() or m.islnk():  # reading it would read another member, or a file outside
            skipped.append(dict(input=f"{tar_path}:{m.name}", reason=_link_member_reason(m)))
    items = []
    for name in sorted(files):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            side = next((stem + s for s in CAPTION_EXTS if stem + s in files), "")
            items.append(InputItem(name=f"{tar_path}:{name}", path=str(tar_path), member=name,
                                   caption_path=str(tar_path) if side else None, caption_member=side))
    return items, skipped


def _link_member_reason(member: tarfile.TarInfo) -> str:
    kind = "symbolic" if member.issym() else "hard"
    return f"link member not followed (a {kind} link to {member.linkname})"


def _outside_reason(path: Path, root: Path, what: str = "") -> Optional[str]:
    """The skip reason when the file `path` of the input folder `root` leads outside it, else None."""
    why = link_escape(str(path), str(root))
    return f"{what}leads outside its input folder ({why})" if why else None


def _folder_items(folder: Path) -> tuple[list[InputItem], list[dict]]:
    items, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ext = path.suffix.lower()
        is_tar = path.name.endswith((".tar", ".tar.gz", ".tgz"))
        if ext not in IMAGE_EXTS and not is_tar:
            continue
        reason = _outside_reason(path, folder)
        if reason:
            skipped.append(dict(input=str(path), reason=reason))
        elif is_tar:
            got, bad = _tar_items(path)
            items.extend(got)
            skipped.extend(bad)
        else:
            side = next((path.with_suffix(s) for s in CAPTION_EXTS if path.with_suffix(s).is_file()), None)
            reason = _outside_reason(side, folder, "caption ") if side else None
            if reason:
                skipped.append(dict(input=str(path), reason=reason))
            else:
                items.append(InputItem(name=str(path), path=str(path), caption_path=str(side) if side else None))
    return items, skipped


def _jsonl_path_reason(path: Path) -> Optional[str]:
    """Why a jsonl's image path may not be read. The jsonl is the user's own list, like paths
    on a command line, so it may name files anywhere (absolute, or with `..`: image stores
    usually live apart from their lists); but the file it names must be that file, not a link
    leading out of its own folder or a hard link. A missing file is left to the read, which
    skips it as not found."""
    return _outside_reason(path, path.parent) if os.path.lexists(path) else None


def _jsonl_items(jsonl: Path) -> tuple[list[InputItem], list[dict]]:
    items, skipped = [], []
    for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{jsonl}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append(dict(input=where, reason=f"not JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            skipped.append(dict(input=where, reason="no 'path' string"))
            continue
        path = Path(row["path"]) if os.path.isabs(row["path"]) else jsonl.parent / row["path"]
        reason = _jsonl_path_reason(path)
        if reason:
            skipped.append(dict(input=str(path), reason=reason))
            continue
        caption = row.get("caption")
        items.append(InputItem(name=str(path), path=str(path),
                               caption=caption if isinstance(caption, str) else None))
    return items, skipped


def list_inputs(inputs) -> tuple[list[InputItem], list[dict]]:
    """Every input image, sorted by name; plus what could not be listed (bad jsonl lines, damaged tars,
    files and tar members that would lead outside their input folder)."""
    if not inputs:
        raise ValueError("--input: give at least one image folder, tar file or jsonl file")
    items, skipped = [], []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            got, bad = _folder_items(path)
        elif path.is_file() and path.name.endswith((".tar", ".tar.gz", ".tgz")):
            got, bad = _tar_items(path)
        elif path.is_file() and path.suffix == ".jsonl":
            got, bad = _jsonl_items(path)
        elif path.exists():
            raise ValueError(f"--input {raw}: expected a folder, a .tar/.tar.gz file or a .jsonl file")
        else:
            raise FileNotFoundError(f"--input {raw} does not exist")
        items.extend(got)
        skipped.extend(bad)
    items.sort(key=lambda it: it.name)
    return items, skipped


# ------------------------------------------------------------------------------ reading one input

def _open_tar(path: str):
    """(open tar, {name: member}) of the members before any damage (tarfile's own name lookup
    reads the whole index and fails on a truncated file)."""
    tar = tarfile.open(path)
    infos = {}
    try:
        while (member := tar.next()) is not None:
            infos[member.name] = member
    except (tarfile.TarError, OSError, EOFError):
        pass  # listed as damaged when the inputs were collected
    return tar, infos


def _read_bytes(path: str, member: str, tars: dict, what: str) -> bytes:
    """The bytes of a file or tar member; ValueError (the skip reason) if they cannot be read."""
    try:
        if not member:
            with open(path, "rb") as f:
                return f.read()
        if path not in tars:
            tars[path] = _open_tar(path)
        tar, infos = tars[path]
        if member not in infos:
            raise ValueError(f"{what} member not found")
        f = tar.extractfile(infos[member])
        if f is None:
            raise ValueError(f"{what} is not a regular file")
        return f.read()
    except FileNotFoundError:
        raise ValueError(f"{what} file not found") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        # a truncated member: tarfile raises ReadError("unexpected end of data")
        raise ValueError(f"unreadable {what} ({type(exc).__name__})") from None


def read_item(item: InputItem, tars: dict) -> tuple[bytes, str]:
    """(encoded image bytes, caption) of one input, or a ValueError whose text is the skip reason."""
    if item.caption is not None:
        caption = item.caption
    elif item.caption_path is not None:
        try:
            caption = _read_bytes(item.caption_path, item.caption_member, tars, "caption").decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError("caption is not UTF-8 text") from None
        if (item.caption_member or item.caption_path).endswith(".json"):
            try:
                caption = json.loads(caption)["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                caption = None
            if not isinstance(caption, str):
                raise ValueError("caption json has no 'caption' string") from None
    else:
        raise ValueError("missing caption")
    return _read_bytes(item.path, item.member, tars, "image"), caption

