"""Trainer errors: a CamelCase reason, a human message and the process exit code."""

from __future__ import annotations

# Exit codes of ``python -m kubelora.trainer``. A run whose gates failed still completed: it exits 0
# (the result event says ``eval.passed: false``) unless ``--gates-failed-exit-code`` says otherwise.
EXIT_SUCCEEDED = 0
EXIT_ERROR = 1  # may succeed if retried (storage, a crash mid-training)
EXIT_USAGE = 2
EXIT_PERMANENT = 3  # a retry cannot help (bad spec, bad data, model does not fit): the operator fails the Job
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


class InvalidSpecError(TrainerError):
    reason = "InvalidSpec"
    exit_code = EXIT_PERMANENT


class BaseModelNotFoundError(TrainerError):
    reason = "BaseModelNotFound"
    exit_code = EXIT_PERMANENT


class UnsafeWeightsError(TrainerError):
    reason = "UnsafeWeights"
    exit_code = EXIT_PERMANENT


class DatasetNotFoundError(TrainerError):
    reason = "DatasetNotFound"
    exit_code = EXIT_PERMANENT


class MalformedDatasetError(TrainerError):
    reason = "MalformedDataset"
    exit_code = EXIT_PERMANENT


class UnknownTargetModulesError(TrainerError):
    reason = "UnknownTargetModules"
    exit_code = EXIT_PERMANENT


class RankTooLargeError(TrainerError):
    reason = "RankTooLarge"
    exit_code = EXIT_PERMANENT


class QuantizationUnavailableError(TrainerError):
    reason = "QuantizationUnavailable"
    exit_code = EXIT_PERMANENT


class InsufficientGPUMemoryError(TrainerError):
    reason = "InsufficientGPUMemory"
    exit_code = EXIT_PERMANENT


class StorageError(TrainerError):
    reason = "StorageError"


class VerificationError(TrainerError):
    reason = "VerificationFailed"


class PublishError(TrainerError):
    reason = "PublishFailed"


class TrainingError(TrainerError):
    reason = "TrainingFailed"


class OutOfMemoryError(TrainerError):
    reason = "OutOfMemory"
    exit_code = EXIT_PERMANENT


class EvaluationError(TrainerError):
    reason = "EvaluationFailed"


class TrainingInterruptedError(TrainerError):
    reason = "Interrupted"
    exit_code = EXIT_INTERRUPTED
