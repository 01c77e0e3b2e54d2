"""Artifact folders as gzip tars: packed by the host, extracted safely by the agent.

Extraction trusts nothing in the archive. The tar is read as a stream through
a cap on decompressed bytes; each member is checked by us (only regular files
and folders: no links of either kind, no devices; no absolute names, no ``..``,
nothing resolving outside the destination; caps on member count and total
bytes) and then extracted by ``tarfile`` with its ``data`` filter (Python
3.11.4+), which enforces most of the same rules a second time.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edge_compress.profile.agent.protocol import AgentPayloadTooLargeError, AgentRequestError


class UnsafeArchiveError(AgentRequestError):
    """A member of the uploaded archive is a link, a device, or would land outside the job folder."""


@dataclass(frozen=True)
class ExtractLimits:
    max_bytes: int = 1 << 30
    max_members: int = 10_000


def pack_folder(folder: str | os.PathLike) -> bytes:
    """A gzip tar of ``folder``'s contents, names relative to it; links are refused, not followed."""
    root = Path(folder)
    if not root.is_dir():
        raise AgentRequestError(f"'{root}' is not a folder; give an artifact folder written by "
                                "`edge-compress export`")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise AgentRequestError(f"'{path}' is a link or special file; an artifact holds only regular "
                                        "files and folders")
            tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False, filter=_anonymous)
    return buf.getvalue()


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike, limits: ExtractLimits) -> Path:
    """Extract the gzip tar ``archive`` into the existing empty folder ``dest``.

    The tar is read as a stream through a cap on decompressed bytes, so neither a
    gzip bomb nor a giant header in the archive can exhaust memory or disk; each
    member is checked, then extracted, in order.
    """
    dest = Path(dest).resolve()
    raw_cap = limits.max_bytes + 1024 * limits.max_members + (1 << 20)  # headers and padding on top
    try:
        with gzip.open(archive, "rb") as gz, tarfile.open(fileobj=_Capped(gz, raw_cap), mode="r|") as tar:
            count = total = 0
            for m in tar:
                count, total = count + 1, total + m.size
                _check_limits(count, total, limits)
                _check_member(m, dest)
                tar.extract(m, dest, set_attrs=False, filter="data")
    except tarfile.FilterError as e:  # our checks should have caught it first
        raise UnsafeArchiveError(f"unsafe archive: {e}", 400) from e
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise AgentRequestError(f"the upload is not a readable gzip tar archive ({e})", 400) from e
    return dest


class _Capped(io.RawIOBase):
    """A reader that refuses to yield more than ``cap`` bytes of the stream under it."""

    def __init__(self, inner, cap: int) -> None:
        self.inner, self.left = inner, cap

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(self.left + 1 if n < 0 else min(n, self.left + 1))
        self.left -= len(data)
        if self.left < 0:
            raise AgentPayloadTooLargeError("the archive decompresses to more than the agent's extraction "
                                            "limit", 413)
        return data


def _check_limits(count: int, total: int, limits: ExtractLimits) -> None:
    if count > limits.max_members:
        raise AgentPayloadTooLargeError(f"the archive has more than {limits.max_members} members, the agent's "
                                        "limit", 413)
    if total > limits.max_bytes:
        raise AgentPayloadTooLargeError(f"the archive extracts to more than {limits.max_bytes} bytes, the "
                                        "agent's limit (start it with a larger cap if the artifact is genuine)",
                                        413)


def _check_member(m: tarfile.TarInfo, dest: Path) -> None:
    name = m.name
    if m.issym() or m.islnk():
        raise UnsafeArchiveError(f"unsafe archive: member '{name}' is a {'symbolic' if m.issym() else 'hard'} "
                                 f"link (to '{m.linkname}'); links are refused", 400)
    if not (m.isfile() or m.isdir()):
        raise UnsafeArchiveError(f"unsafe archive: member '{name}' is a device, fifo or other special file; "
                                 "only regular files and folders are accepted", 400)
    p = PurePosixPath(name)
    if not name or "\\" in name or "\x00" in name or p.is_absolute() or ".." in p.parts:
        raise UnsafeArchiveError(f"unsafe archive: member name '{name}' is absolute or contains '..'; names "
                                 "must be relative to the artifact folder", 400)
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        raise UnsafeArchiveError(f"unsafe archive: member '{name}' resolves to '{target}', outside the job "
                                 "folder", 400)
