"""User-facing errors.

Anything a user can fix (a missing file, an ROI outside the volume, a bad manifest) is raised as
:class:`IPMNError` with a one-line message. The CLI prints it as ``ipmn: error: <message>`` and exits
with status 2; the Slicer modules show it in the panel. Programming errors stay ordinary exceptions.
"""


class IPMNError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
