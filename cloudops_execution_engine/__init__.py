"""Run commands and plans of commands on a supervised pool of worker processes."""

import logging as _logging

from .commands import AwsCliCommand, Command, ExecCommand, ScriptCommand, ShellCommand
from .config import ExecutionConfig, RayConfig, RetentionPolicy
from .engine import ExecutionEngine, LogNode
from .errors import (
    Cancelled,
    CommandFailed,
    EngineClosed,
    ExecutionError,
    InvalidCommand,
    InvalidPlan,
    InvalidWorkingDir,
    IoError,
    MissingField,
    NotCompleted,
    NotFound,
    NotRunning,
    ScriptNotFound,
    SerializationError,
    SpawnFailed,
    Timeout,
    TimeoutTooLarge,
    ValidationError,
)
from .events import (
    CancelledEvent,
    CompletedEvent,
    EventHandler,
    ExecutionEvent,
    FailedEvent,
    ProgressEvent,
    StartedEvent,
    StderrEvent,
    StdoutEvent,
)
from .requests import (
    DependencyGraphStrategy,
    ExecutionMetadata,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionStrategy,
    ParallelStrategy,
    ResourceLimits,
    RetryPolicy,
    SerialStrategy,
)
from .results import (
    ExecutionResult,
    ExecutionStats,
    ExecutionStatus,
    ExecutionSummary,
    PlanExecutionResult,
    ResourceUsage,
)
from .sync import SyncExecutionEngine

__version__ = "0.1.0"

# Quiet by default, as a library should be: the host decides where records go.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "AwsCliCommand",
    "Cancelled",
    "CancelledEvent",
    "Command",
    "CommandFailed",
    "CompletedEvent",
    "DependencyGraphStrategy",
    "EngineClosed",
    "EventHandler",
    "ExecCommand",
    "ExecutionConfig",
    "ExecutionEngine",
    "ExecutionError",
    "ExecutionEvent",
    "ExecutionMetadata",
    "ExecutionPlan",
    "ExecutionRequest",
    "ExecutionResult",
    "ExecutionStats",
    "ExecutionStatus",
    "ExecutionStrategy",
    "ExecutionSummary",
    "FailedEvent",
    "InvalidCommand",
    "InvalidPlan",
    "InvalidWorkingDir",
    "IoError",
    "LogNode",
    "MissingField",
    "NotCompleted",
    "NotFound",
    "NotRunning",
    "ParallelStrategy",
    "PlanExecutionResult",
    "ProgressEvent",
    "RayConfig",
    "ResourceLimits",
    "ResourceUsage",
    "RetentionPolicy",
    "RetryPolicy",
    "ScriptCommand",
    "ScriptNotFound",
    "SerialStrategy",
    "SerializationError",
    "ShellCommand",
    "SpawnFailed",
    "StartedEvent",
    "StderrEvent",
    "StdoutEvent",
    "SyncExecutionEngine",
    "Timeout",
    "TimeoutTooLarge",
    "ValidationError",
]
