"""Typed errors shared by every interface. Each carries a short machine-readable code that
transports turn into their own error shape (an error event, an HTTP status, an MQTT message)."""

from __future__ import annotations


class VoxflowError(Exception):
    code = "voxflow_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidRequest(VoxflowError):
    """The caller asked for something malformed or out of range."""

    code = "invalid_request"


class UnknownVoice(VoxflowError):
    code = "unknown_voice"


class VoiceFileError(VoxflowError, ValueError):
    """The file is not a Piper VITS voice this loader understands."""

    code = "voice_file_invalid"


class LimitExceeded(VoxflowError):
    """A documented limit (text size, queue, contexts) was hit."""

    code = "limit_exceeded"


class AtCapacity(LimitExceeded):
    """A server-wide or per-client cap on places (connections, streams, sessions) is reached:
    try again later (HTTP 503, WebSocket close 1013)."""

    http_status = 503


class StreamClosed(VoxflowError):
    """Text was pushed to a stream that has ended or was cancelled."""

    code = "stream_closed"


class VoiceConflict(VoxflowError):
    """The registry's present state refuses the change: a voice of that name exists
    (`voice_exists`), or streams are using the voice (`voice_in_use`)."""

    code = "voice_conflict"
    http_status = 409


class VoiceProtected(VoxflowError):
    """The embedded voice and the configured default voice cannot be removed."""

    code = "voice_protected"
    http_status = 403


class ForbiddenPath(VoxflowError):
    """A voice path outside the configured voice directories (through `..` or a symlink too)."""

    code = "forbidden_path"
    http_status = 403


class VoiceStoreError(VoxflowError):
    """Voice files could not be written or deleted (a full or read-only voice directory)."""

    code = "voice_store_failed"
    http_status = 500


class ConsentRequired(VoxflowError):
    """A matched voice was asked for without a consent statement or an operator attestation."""

    code = "consent_required"
    http_status = 400


class ConsentRefused(VoxflowError):
    """The consent statement does not say the statement's words, or is not the reference's speaker."""

    code = "consent_refused"
    http_status = 422
