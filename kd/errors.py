"""Error classes that decide exit codes and retries.

`InputError` (and subclasses) mean the user must change something: the CLI exits 2 and the
Prefect tasks do not retry. `TransientError` means trying again may help (network, a flaky
worker): tasks retry it. Anything else is a failed run (exit 1) and is not retried either.
"""


class InputError(Exception):
    """Invalid input: config, model, tokenizer/vocab or data. Exit code 2, never retried."""


class ConfigError(InputError):
    """A RunConfig field is invalid; the message names the field."""


class ModelError(InputError):
    """A model source cannot be used (missing repo, pickle-only weights, bad folder...)."""


class VocabError(InputError):
    """Teacher and student vocabularies cannot be aligned."""


class DataError(InputError):
    """The training/eval data cannot be used (empty, too small, unreadable)."""


class TransientError(Exception):
    """A failure that may pass on retry (network error, HTTP 5xx/429, interrupted worker)."""


class GateFailure(Exception):
    """An eval gate or falsifier failed: the run is written down as `fail` and exits 1."""
