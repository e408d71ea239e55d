"""Run commands and plans of commands on a supervised pool of worker processes."""

import importlib as _importlib
import logging as _logging
import typing as _typing
from types import ModuleType as _ModuleType

if _typing.TYPE_CHECKING:
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

# Each public name is imported from its module on first use (PEP 562), so that
# `import cloudops_execution_engine` costs little and a worker process loads
# only the modules it runs. A name exported here is listed in `_HOMES` too.
_HOMES = {
    "AwsCliCommand": "commands",
    "Command": "commands",
    "ExecCommand": "commands",
    "ScriptCommand": "commands",
    "ShellCommand": "commands",
    "ExecutionConfig": "config",
    "RayConfig": "config",
    "RetentionPolicy": "config",
    "ExecutionEngine": "engine",
    "LogNode": "engine",
    "Cancelled": "errors",
    "CommandFailed": "errors",
    "EngineClosed": "errors",
    "ExecutionError": "errors",
    "InvalidCommand": "errors",
    "InvalidPlan": "errors",
    "InvalidWorkingDir": "errors",
    "IoError": "errors",
    "MissingField": "errors",
    "NotCompleted": "errors",
    "NotFound": "errors",
    "NotRunning": "errors",
    "ScriptNotFound": "errors",
    "SerializationError": "errors",
    "SpawnFailed": "errors",
    "Timeout": "errors",
    "TimeoutTooLarge": "errors",
    "ValidationError": "errors",
    "CancelledEvent": "events",
    "CompletedEvent": "events",
    "EventHandler": "events",
    "ExecutionEvent": "events",
    "FailedEvent": "events",
    "ProgressEvent": "events",
    "StartedEvent": "events",
    "StderrEvent": "events",
    "StdoutEvent": "events",
    "DependencyGraphStrategy": "requests",
    "ExecutionMetadata": "requests",
    "ExecutionPlan": "requests",
    "ExecutionRequest": "requests",
    "ExecutionStrategy": "requests",
    "ParallelStrategy": "requests",
    "ResourceLimits": "requests",
    "RetryPolicy": "requests",
    "SerialStrategy": "requests",
    "ExecutionResult": "results",
    "ExecutionStats": "results",
    "ExecutionStatus": "results",
    "ExecutionSummary": "results",
    "PlanExecutionResult": "results",
    "ResourceUsage": "results",
    "SyncExecutionEngine": "sync",
}


def __getattr__(name: str) -> _typing.Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # The public names and what is imported here, but not the submodules that
    # importing sets as attributes of the package.
    return sorted({*__all__, *(n for n, v in globals().items() if not isinstance(v, _ModuleType))})


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
