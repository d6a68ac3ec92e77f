"""Errors the user can fix.

``UserError`` carries a one-line message that names the file or flag and what
was expected; the command-line scripts print it without a traceback and exit
with status 2.
"""


class UserError(Exception):
    """A bad file, flag or configuration: the message is shown to the user as is."""

    exit_code = 2
