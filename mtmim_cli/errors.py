"""One exception type for user-facing failures: the CLI prints its message on one line."""


class MtmimError(Exception):
    """A failure caused by the user's input (file, option, data), not by a bug.

    The message names the file and the reason; the CLI prints it as one line and exits 2.
    """
