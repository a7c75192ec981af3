"""The one exception type users see: a sentence saying what is wrong and what to do."""


class Nf4tuneError(Exception):
    """Bad input or a state nf4tune cannot work with. The CLI prints its message, not a traceback."""
