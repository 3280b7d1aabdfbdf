"""The one exception type for errors a user can cause; the CLI turns it into exit code 2 and one line."""


class LabError(Exception):
    """A user-fixable problem. The message says what to change, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
