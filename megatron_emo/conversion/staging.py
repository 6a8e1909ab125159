"""Write a conversion's output next to its destination and move it there only when complete.

A conversion killed half-way must not leave anything at the output path that looks like a
checkpoint. ``staged_output_dir`` hands out a hidden sibling directory
(``.<name>.partial-<host>-<pid>-<random>``) on the same file system, renames it to the output path
after the body returned, and deletes it when the body raised. A SIGKILL leaves only the hidden
directory; the next conversion to the same path removes such leftovers of dead processes on this
host. No megatron import.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator

__all__ = ["staged_output_dir"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(parent: str, prefix: str, host: str) -> None:
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split("-")
        if len(parts) >= 3 and parts[0] == host and parts[1].isdigit() \
                and not _pid_alive(int(parts[1])):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(path: str, *, what: str,
                      is_previous_output: Callable[[str], bool]) -> Iterator[str]:
    """Yields an empty temporary directory that becomes ``path`` when the body succeeds.

    Args:
        path: the output directory. It may be absent, an empty directory, or a previous output
            of the same kind (``is_previous_output``), which is replaced only after the new one
            is complete.
        what: what is written, for messages (e.g. ``"Megatron checkpoint"``).
        is_previous_output: tells whether an existing non-empty ``path`` may be replaced.

    Raises:
        FileExistsError: ``path`` exists and is a file or a directory with other content.
    """
    final = os.path.abspath(path.rstrip("/") or path)
    parent, name = os.path.split(final)
    if os.path.lexists(final):
        if not os.path.isdir(final) or (os.listdir(final) and not is_previous_output(final)):
            raise FileExistsError(
                f"output {final} exists and is not an empty directory or a previous {what}; "
                f"remove it or choose another output path")
    os.makedirs(parent, exist_ok=True)
    host = socket.gethostname().replace("-", "_")
    prefix = f".{name}.partial-"
    _remove_stale_partials(parent, prefix, host)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{host}-{os.getpid()}-", dir=parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the usual mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(final):
        old = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
        os.rename(final, os.path.join(old, name))
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
