"""The one exception type for errors a user can cause and fix."""


class GrowlmError(ValueError):
    """A user-caused error with one actionable line; the CLI prints it and exits with code 2."""
