"""The one exception type for user mistakes: the CLI prints it as a single line and exits 2."""


class UsageError(Exception):
    """Bad config, bad arguments or bad input paths: something the user can fix."""
