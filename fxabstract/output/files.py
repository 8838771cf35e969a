"""Files: every file fxabstract writes lands whole or not at all.

`write_atomic` writes to a temporary file in the target folder and renames it into place; `staged`
does the same for a set of files that belong together (all of them or none); `check_new` refuses to
overwrite what exists unless asked.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from contextlib import contextmanager

from ..errors import OutputError


def check_new(paths: list[str], force: bool) -> None:
    """OutputError if any of `paths` exists and force is not set: nothing is overwritten unasked."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise OutputError(f"{' and '.join(existing)} already {'exist' if len(existing) > 1 else 'exists'}; "
                          "pass force=True (--force) to overwrite, or choose another path")


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file.
    An OSError (missing or read-only folder, disk full) is an OutputError; the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fxabstract-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}; choose a writable folder") from None
        raise


@contextmanager
def staged(folder: str, names: tuple[str, ...]):
    """Yield a hidden staging folder inside `folder`; when the block ends without error, rename each of
    `names` from it into `folder`. An error or Ctrl-C in the block leaves no output, new or partial;
    the staging folder is always removed."""
    try:
        staging = tempfile.mkdtemp(prefix=".fxabstract-", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write into {folder}: {exc.strerror or exc}; choose a writable folder") from None
    try:
        yield staging
        for name in names:
            try:
                os.replace(os.path.join(staging, name), os.path.join(folder, name))
            except OSError as exc:
                raise OutputError(f"cannot write {os.path.join(folder, name)}: {exc.strerror or exc}; "
                                  "choose a writable folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_png(fig, path: str, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG file, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())
