"""One exception tree for Bedside.

Every error a user can meet derives from :class:`BedsideError` and carries a message a person can
act on: what was wrong (the file, row, column, option, topic or key), and what to do about it.
The CLI maps them to exit codes: 2 for bad input or usage (:class:`InputError` and its children),
1 for every other failure. Tracebacks are shown only with ``BEDSIDE_DEBUG=1``.
"""

from __future__ import annotations


class BedsideError(Exception):
    """Base of every Bedside error. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(BedsideError):
    """The user's input (a file, an option, a config value) is wrong. Exit code 2."""

    exit_code = 2


class ConfigError(InputError):
    """A configuration file or option is missing, malformed or inconsistent."""


class SchemaError(InputError):
    """Input rows do not match a model's input schema (column, type, range, window length)."""


class DataError(InputError):
    """A data file cannot be used (unreadable, empty, wrong label column, too few rows)."""


class IntegrityError(BedsideError):
    """A file or message is not what its manifest or signature says it is. Refused, never used."""


class ModelError(BedsideError):
    """A model cannot be built, exported, imported or loaded."""


class ExportError(ModelError):
    """ONNX export failed a check (parity, single file, parameter names)."""


class WireError(BedsideError):
    """A message on the wire was rejected. ``reason`` is a short machine-readable code."""

    reason = "malformed"


class EnvelopeError(WireError):
    """The bytes are not a well-formed envelope (framing, header schema, tensor index, body)."""


class TooLargeError(EnvelopeError):
    """The message is larger than the configured limit."""

    reason = "too_large"


class SignatureError(WireError):
    """The signature is missing, does not verify, or the signer is not a known key."""

    reason = "bad_signature"


class UnknownSenderError(SignatureError):
    """The sender id has no enrolled or pinned public key."""

    reason = "unknown_sender"


class ValidationError(WireError):
    """A well-formed, authentic message fails a semantic check (round, shapes, finite, norm)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeyStoreError(BedsideError):
    """A key file is missing, unreadable, has unsafe permissions or is of the wrong kind."""


class PrivacyError(BedsideError):
    """A privacy computation cannot be done as asked."""


class BudgetExceededError(PrivacyError):
    """Contributing would take the device past its configured privacy budget. Refused."""


class PolicyDeclined(PrivacyError):
    """A round's settings fall outside this device's own privacy policy. Declined (reason
    ``policy``), whatever the aggregator announced."""


class LedgerError(PrivacyError):
    """The privacy ledger cannot be read or written. Contributions are refused (fail closed)."""


class TransportError(BedsideError):
    """The broker or peer cannot be reached, or a publish was not confirmed."""


class StateError(BedsideError):
    """A state database is unreadable or inconsistent."""
