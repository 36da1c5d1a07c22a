"""The exit statuses of ``instaclone`` (``instaclone help exit-codes`` prints the table)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the daemon reported an error, or what was asked did not happen (a job failed, check: not cloneable)
EXIT_USAGE = 2  # the command line is wrong
EXIT_UNREACHABLE = 3  # no daemon at the socket, or it went away mid-answer
EXIT_PERMISSION = 4  # the socket or the API refused this user (socket mode/group, access.*_groups)
EXIT_EXEC_TOOL = 125  # exec: instaclone's own failure, the command did not run (like docker exec)
EXIT_EXEC_TIMEOUT = 124  # exec: the command ran past --timeout and was killed (like timeout(1))
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # stdout closed early (| head): quiet, 128 + SIGPIPE like coreutils

EXIT_CODES: tuple[tuple[int | str, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "the daemon reported an error, or the outcome is a failure (a job not Unstunned, "
                  "check: not cloneable, gc: some files not removed)"),
    (EXIT_USAGE, "usage error (bad option or argument)"),
    (EXIT_UNREACHABLE, "the daemon cannot be reached, or went away mid-answer"),
    (EXIT_PERMISSION, "permission denied: not in the socket's group, or a rule of [access] refused (named)"),
    ("N", "exec: the command's own exit status (128+S if it was killed by signal S)"),
    (EXIT_EXEC_TIMEOUT, "exec: the command ran past --timeout and was killed"),
    (EXIT_EXEC_TOOL, "exec: instaclone's own failure (no agent, clone not running, daemon error); "
                     "the command did not run"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_BROKEN_PIPE, "the reader of stdout went away (e.g. | head); nothing is printed"),
)
