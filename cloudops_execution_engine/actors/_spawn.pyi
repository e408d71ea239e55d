def spawn(
    path: bytes,
    argv: list[bytes],
    env: list[bytes],
    cwd: bytes,
    stdout_fd: int,
    stderr_fd: int,
    default_signals: tuple[int, ...],
    limits: tuple[tuple[int, int, int], ...],
    stdin_fd: int = -1,
    nice: int = 0,
    affinity: tuple[int, ...] = (),
) -> int: ...
def record_own() -> None: ...
def restore_own() -> int: ...
