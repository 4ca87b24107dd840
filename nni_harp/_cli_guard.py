"""How every entry point of nni-harp runs a command (:func:`guarded`): SIGTERM ends it like Ctrl-C,
and every error that is not a bug becomes one line on stderr and an exit code. User errors (bad
model name, bad target, missing data, an output folder that cannot be used, a damaged file to read
back, a full disk) exit with status 2; a run stopped by a NaN/inf loss exits with 3; an interrupted
run (Ctrl-C: 130, SIGTERM: 143) says what was saved and the command that continues it
(:func:`resume_command`). Used by :mod:`nni_harp.cli` and :mod:`nni_harp.trial`."""
from __future__ import annotations

import errno
import shlex
import signal
import sys
from typing import Any, Callable, Sequence

from .distributed import env_rank

__all__ = ["EXIT_USER_ERROR", "EXIT_NONFINITE", "EXIT_INTERRUPTED", "guarded", "resume_command", "fail"]

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT; a SIGTERM exits with 128 + SIGTERM = 143
# errors of the disk or the folder, not of the program: a message, not a traceback
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                   errno.EISDIR, errno.EFBIG, errno.EEXIST}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the request cannot be done as asked', shown without a traceback."""
    from graph_passes import PlanError

    from .data import DatasetError
    from .loading import LoadError
    from .pipeline import CheckpointWriteError, ConfigError, ResumeError

    from .distributed import DistributedError

    errors: list[type[BaseException]] = [
        ConfigError, DatasetError, ResumeError, LoadError, FileNotFoundError, DistributedError, PlanError,
        CheckpointWriteError,
    ]
    from .adversarial import AdversarialError
    from .pruning import PruningError

    errors += [AdversarialError, PruningError]
    return tuple(errors)


def fail(message: str, code: int = EXIT_USER_ERROR, prog: str = "nni-harp") -> int:
    rank = env_rank()
    print(f"{prog}: error: {f'[rank {rank}] ' if rank else ''}{message}", file=sys.stderr)
    return code


def resume_command(prog: str, argv: Sequence[str]) -> str:
    """The command line that continues the run ``argv`` started: ``--resume`` for ``--overwrite``."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([*shlex.split(prog), *args])


def guarded(command: Callable[[], int], *, prog: str = "nni-harp", resume: str | None = None,
            model: str | None = None) -> int:
    """Run ``command`` the way every entry point of nni-harp does: SIGTERM ends it like Ctrl-C
    (every finished epoch is already saved; the message names ``resume``, the command that
    continues it), and every error that is not a bug becomes one line on stderr and an exit code."""
    from graph_passes import GraphPassError

    from .pipeline import RunInterrupted
    from .pipeline._loop import NonFiniteLossError

    received: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return command()
    except NonFiniteLossError as exc:
        return fail(str(exc), EXIT_NONFINITE, prog)
    except KeyboardInterrupt as exc:
        code = 128 + received[0] if received else EXIT_INTERRUPTED
        how = f"stopped by {signal.Signals(received[0]).name}" if received else "interrupted"
        if isinstance(exc, RunInterrupted) and exc.resumable and resume:
            return fail(f"{how}; {exc.saved}; to continue: {resume}", code, prog)
        saved = f"; {exc.saved}" if isinstance(exc, RunInterrupted) else ""
        return fail(f"{how}{saved}", code, prog)
    except _user_errors() as exc:
        return fail(str(exc), prog=prog)
    except GraphPassError as exc:
        return fail(
            f"the pruning graph cannot handle {model or 'this model'}: {exc}"
            " (`nni-harp list-models PATTERN --check` shows supported models; --mode unstructured needs no graph)",
            prog=prog,
        )
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        again = f"; finished epochs are kept: fix it, then run {resume}" if resume else ""
        return fail(f"{exc.strerror or exc}{where}: free space or fix the folder's permissions{again}", prog=prog)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
