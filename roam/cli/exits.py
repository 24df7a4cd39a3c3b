"""The exit codes of every `roam` command: one table, picked by error code, never by text.

Shown by `roam --help` and `roam migrate --help`, and in docs/API.md. Until issue 11,
`roam migrate` exited 2 when in doubt; that is now 4 (2 is the CLI framework's usage
error).
"""

from __future__ import annotations

import enum

from roam.errors import ErrorCode


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1  # the command failed; the VM (if any) is intact where it was
    USAGE = 2  # bad options or arguments (typer/click's own)
    POSTCOPY_FAILED = 3  # handed over, post-copy failed: the destination owns the VM
    IN_DOUBT = 4  # authority sent, never acknowledged: the source stays paused
    DECLINED = 5  # the destination refused the VM, which runs on at its source
    TIMEOUT = 124  # no answer in time, or the command run in the VM timed out


_BY_CODE = {
    ErrorCode.POSTCOPY_FAILED: Exit.POSTCOPY_FAILED,
    ErrorCode.IN_DOUBT: Exit.IN_DOUBT,
    ErrorCode.DECLINED: Exit.DECLINED,
    ErrorCode.TIMEOUT: Exit.TIMEOUT,
}


def for_code(code: ErrorCode) -> Exit:
    """The exit code of a command that failed with an error of this code."""
    return _BY_CODE.get(code, Exit.FAILED)


TABLE = """Exit codes: 0 ok (a terminator or mounter declining on purpose is ok: the backup \
was taken); 1 failed, the VM is intact where it was; 2 usage error; 3 post-copy failed \
(the destination owns the VM, missing blocks); 4 in doubt (the source stays paused: \
settle with `roam peer resume` or `roam peer stop`, docs/MIGRATION.md; was 2 before); \
5 declined by the destination (the VM runs on at its source); 124 timeout. `roam exec` \
and `roam peer exec` exit with the command's own code."""
