"""Trainer errors: a CamelCase reason, a human message and the process exit code."""

from __future__ import annotations

# Exit codes of ``python -m kubelora.trainer``.
EXIT_SUCCEEDED = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATES_FAILED = 3
EXIT_INTERRUPTED = 143


class TrainerError(Exception):
    """A failure the trainer reports as ``{"type":"error","reason":..., "message":...}``."""

    reason = "TrainerError"
    exit_code = EXIT_ERROR

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidSpec(TrainerError):
    reason = "InvalidSpec"


class BaseModelNotFound(TrainerError):
    reason = "BaseModelNotFound"


class UnsafeWeights(TrainerError):
    reason = "UnsafeWeights"


class DatasetNotFound(TrainerError):
    reason = "DatasetNotFound"


class MalformedDataset(TrainerError):
    reason = "MalformedDataset"


class UnknownTargetModules(TrainerError):
    reason = "UnknownTargetModules"


class RankTooLarge(TrainerError):
    reason = "RankTooLarge"


class QuantizationUnavailable(TrainerError):
    reason = "QuantizationUnavailable"


class InsufficientGPUMemory(TrainerError):
    reason = "InsufficientGPUMemory"


class StorageError(TrainerError):
    reason = "StorageError"


class VerificationFailed(TrainerError):
    reason = "VerificationFailed"


class PublishFailed(TrainerError):
    reason = "PublishFailed"


class TrainingFailed(TrainerError):
    reason = "TrainingFailed"


class EvaluationFailed(TrainerError):
    reason = "EvaluationFailed"


class Interrupted(TrainerError):
    reason = "Interrupted"
    exit_code = EXIT_INTERRUPTED
