"""User-fixable errors. Scripts print them as one line and exit 1; anything else is a bug."""


FIRST_LINE_LIMIT = 300


def first_line(exc: BaseException, limit: int = FIRST_LINE_LIMIT) -> str:
    """The first line of an exception's message (cut to ``limit``), or its type name when empty:
    what a one-line error quotes from a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class PipelineError(Exception):
    """Something the user can fix: the message says what is wrong and how to fix it."""


class ConfigError(PipelineError):
    """Invalid flags or config file values (all problems are collected into one error)."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class DataError(PipelineError):
    """A data set cannot be found, read or validated."""


class ModelError(PipelineError):
    """A model or tokenizer cannot be loaded."""


class MissingArtifact(PipelineError):
    """An input artifact of an earlier stage is missing or incomplete."""

    def __init__(self, path, command):
        self.path = str(path)
        self.command = command
        super().__init__(f"missing input {self.path} (run `{command}` first)")


class BackendUnavailable(PipelineError):
    """An optional back end (CUDA, TensorRT, boto3, ...) is not usable on this machine."""
