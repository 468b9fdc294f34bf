"""User-facing errors: printed as one clear line by the CLIs, never as a traceback."""


class UserError(Exception):
    """A mistake in the user's input (names, paths, files); the message says what to do."""
