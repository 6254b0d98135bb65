"""The one exception type for mistakes a user can make (bad path, bad policy, impossible budget ...).

The CLI prints it as a single line and exits with code 2; any other exception is a bug in hirelc.
"""


class HirelcError(Exception):
    """A user-caused problem, reported as one line with exit code 2."""
