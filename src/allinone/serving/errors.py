"""The one error for a caller's bad input, raised by whoever knows the field at fault."""

from __future__ import annotations


class InputError(ValueError):
    """The caller sent something this server cannot take; the message says what to fix.

    ``param``: the request field at fault as the client wrote it (``messages.2.content``,
    ``questions[0].choices``); None when whoever raises cannot know it (an engine limit), in
    which case the API family's serving class fills in its input field. ``not_found``: the
    field names something that does not exist (a model, a task): HTTP 404 instead of 400.
    ``code``: a machine-readable reason where the wire format has one
    (``context_length_exceeded``)."""

    code: str | None = None

    def __init__(
        self,
        message: str,
        param: str | None = None,
        not_found: bool = False,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.not_found = not_found
        if code is not None:
            self.code = code
