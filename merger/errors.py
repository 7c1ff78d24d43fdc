"""The one exception type whose message is meant for the user."""


class MergerError(Exception):
    """A problem the user can fix (bad recipe, missing checkpoint, bad name...).

    The CLI prints its message on one line and exits non-zero, without a traceback.
    """
