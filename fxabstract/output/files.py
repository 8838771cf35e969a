"""Files: every file fxabstract writes lands whole or not at all.

`write_atomic` writes to a temporary file in the target folder and renames it into place; `staged`
does the same for a set of files that belong together (all of them or none); `check_new` refuses to
overwrite what exists unless asked.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager

from ..errors import FxAbstractWarning, OutputError

CHATTY = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
          "onnxscript", "onnx_ir")   # loggers of the libraries that export and save


def check_new(paths: list[str], force: bool) -> None:
    """OutputError if any of `paths` exists and force is not set: nothing is overwritten unasked."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise OutputError(f"{' and '.join(existing)} already {'exist' if len(existing) > 1 else 'exists'}; "
                          "pass force=True (--force) to overwrite, or choose another path")


def umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), so no other
    thread ever creates a file under a cleared umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file. The file
    gets the permissions `open()` would give it (0o666 less the umask), not mkstemp's private 0o600.
    An OSError (missing or read-only folder, disk full) is an OutputError; the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fxabstract-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~umask())
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


@contextmanager
def quiet():
    """While torch.export, torch.onnx, onnx or onnxscript run inside an fxabstract call: their warnings
    (deprecations, tracer notes) are dropped and their loggers show errors only, so a valid run prints
    fxabstract's output alone. fxabstract's own warnings still show."""
    loggers = [logging.getLogger(name) for name in CHATTY]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", category=FxAbstractWarning)
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def write_png(fig, path: str, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG file, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())
