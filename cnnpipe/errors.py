"""Errors that end a command with one clear line and a meaningful exit code."""

# Exit codes of every `cnnpipe` command (documented in README.md).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: the traceback is printed
EXIT_BAD_INPUT = 2  # bad params, flags, data or paths (argparse uses 2 too)
EXIT_UNAVAILABLE = 3  # an external service (the MLflow tracking server) cannot be reached
EXIT_INTERRUPTED = 130


class CnnpipeError(Exception):
    """Bad input: the message names the file or field and what was expected."""

    exit_code = EXIT_BAD_INPUT


class ServiceUnavailable(CnnpipeError):
    """A service the stage needs (the tracking store) cannot be reached."""

    exit_code = EXIT_UNAVAILABLE


class RequestError(ValueError):
    """A bad image or request: `status` is the HTTP status a server answers with (400 unreadable, 413 over a
    budget, ...). Ingest's decoder turns it into a listed bad file; the CLI into a CnnpipeError."""

    def __init__(self, message: str, status: int = 400, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close  # the server should close the connection after answering (body left unread)
