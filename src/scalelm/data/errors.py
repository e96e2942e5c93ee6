"""The one exception type of the data layer, in its own module so every data file can raise it."""


class DataError(ValueError):
    """Bad data input or a missing/broken prepared dataset; the message names the problem and the fix."""
