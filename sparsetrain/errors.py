"""The error type for problems with what the user gave (config values, paths, data and checkpoint
files, tokenizers): `train.py` and the other commands print its message on one line and exit 2,
with no traceback, before any model is built."""


class InputError(ValueError):
    """A user input that cannot be used; the message names the field or file and what is allowed."""
