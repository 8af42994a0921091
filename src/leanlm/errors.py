"""The one exception type leanlm raises for bad user input.

Every check of user input (a missing file, an unknown architecture, a tensor of the wrong shape,
a prompt longer than the context) raises :class:`LeanLMError` with a one-line message that names
what was wrong and what was expected. The CLI prints that line and exits with status 2 instead of
showing a traceback; library users can catch it (it is a ``ValueError``).
"""

from __future__ import annotations


class LeanLMError(ValueError):
    """Bad input: the message names the file or field and what was expected."""
