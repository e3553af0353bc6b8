"""User-facing errors.

Everything a user can get wrong (a preset name, a config key, a data file) raises a subclass of
`SdetrError` whose message names the file, the item and what is wrong. The CLI prints these as a
one-line message and exits with status 2 instead of showing a traceback.
"""


class SdetrError(Exception):
    """Base class of errors caused by user input rather than by a bug."""


class ConfigError(SdetrError):
    """An unknown preset, an unknown config key or a value of the wrong type."""


class DataError(SdetrError):
    """A data set that is missing, unreadable or inconsistent."""


class CheckpointError(SdetrError):
    """A checkpoint that cannot be read or does not fit the model."""
