"""One exception type for every mistake a user can fix (bad file, bad flag, wrong checkpoint)."""


class NanoLladaError(Exception):
    """Raised with a one-line message that names the file (and line) and says how to fix it.

    Entry points catch it, print the message and exit with status 2 (see scripts/common/cli.py).
    """
