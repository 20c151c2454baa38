"""The one error type the library raises for bad input: its message names what is wrong and what to do."""


class MixOfShowError(ValueError):
    """Bad input (a file, a field, a value) found before any expensive work starts."""
