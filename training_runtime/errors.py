"""Errors at the boundary: files and flags the user can fix, and interrupted runs.

``UserError`` carries a one-line message that names the file or flag and what
was expected; the command-line scripts print it without a traceback and exit
with status 2. :func:`writing` turns the operating system's "disk full",
"read-only file system" and "permission denied" errors of a write into such
a message. ``RunInterrupted`` is a run stopped by SIGINT / SIGTERM after
saving a checkpoint (exit status 130 / 143).
"""
import contextlib
import errno


class UserError(Exception):
    """A bad file, flag or configuration: the message is shown to the user as is."""

    exit_code = 2


class RunInterrupted(Exception):
    """A signal stopped the run after it saved a checkpoint; ``exit_code`` 128 + signal."""

    def __init__(self, message, exit_code):
        super(RunInterrupted, self).__init__(message)
        self.exit_code = exit_code


_WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or choose another --save-dir",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another --save-dir",
    errno.EROFS: "the file system is read-only: choose another --save-dir",
    errno.EACCES: "permission denied: fix the permissions or choose another --save-dir",
    errno.EPERM: "permission denied: fix the permissions or choose another --save-dir",
}


@contextlib.contextmanager
def writing(path, what="write"):
    """Context of a write to ``path``: ENOSPC, EDQUOT, EROFS, EACCES and EPERM become
    ``UserError("<path>: cannot <what> (<advice>)")``; other errors pass through."""
    try:
        yield
    except OSError as err:
        if err.errno in _WRITE_ADVICE:
            raise UserError("%s: cannot %s (%s)" % (path, what, _WRITE_ADVICE[err.errno]))
        raise
