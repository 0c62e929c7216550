"""Exceptions that carry a one-line, user-facing message."""


class InputError(ValueError):
    """Bad input or configuration: the message names the value or file and what was expected.

    The command line turns it into one line on stderr and exit code 2.
    """


def choice_error(what: str, value: object, choices: list[str] | tuple[str, ...]) -> InputError:
    """Build the standard "unknown name" error, listing the valid choices."""
    return InputError(f"unknown {what} {value!r}; expected one of: {', '.join(sorted(choices))}")
