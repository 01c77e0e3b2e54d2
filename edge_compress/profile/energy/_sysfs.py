"""Reading sysfs attributes: one integer per file, in the unit the driver documents.

Every reader goes through ``read_sysfs`` so a test can make one file unreadable
(tests run as root here, where ``chmod 000`` does not stop a read).
"""

from __future__ import annotations

from pathlib import Path

from edge_compress.errors import DataError


def read_sysfs(path: Path) -> str:
    """The stripped text of one sysfs attribute (raises ``OSError`` as ``open`` does)."""
    return Path(path).read_text().strip()


def read_int(path: Path) -> int:
    """One integer attribute; a non-integer names the file and what it held."""
    text = read_sysfs(path)
    try:
        return int(text)
    except ValueError:
        raise DataError(
            f"{path}: {text!r} is not an integer; a sysfs attribute holds one integer in the "
            "unit its driver documents (check that the path points at the right attribute)"
        ) from None


def unreadable_reason(path: Path, err: OSError) -> str:
    """Why ``path`` could not be read, in words a user can act on."""
    if isinstance(err, PermissionError):
        return f"cannot read {path}: permission denied; run as root or grant read access with `sudo chmod o+r {path}`"
    return f"cannot read {path}: {err.strerror or err}"
