"""The one exception type quaff-fx raises for bad input."""


class QuaffError(Exception):
    """Bad input or an unusable artifact; the message names the thing and the fix."""
