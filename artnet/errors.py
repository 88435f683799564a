"""Errors a user can fix, and finding them again after Ray has wrapped them.

A `UserError` reads as one line: what (a config field, a path or a URI), the problem, and the fix. The CLI
prints it as `error: ...` and exits 2 wherever it was raised: on the driver, in a Ray Train worker or in a Ray
Data task. Ray pickles exceptions across processes, and an exception whose `__init__` takes several
arguments does not survive that by default, so each class here says how to rebuild itself (`__reduce__`).
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix: `subject` (field, path or URI), what is wrong, and what to do."""

    def __init__(self, subject: str, problem: str, fix: str):
        self.subject, self.problem, self.fix = subject, problem, fix
        super().__init__(f"{self._label()}: {problem}. Fix: {fix}")

    def _label(self) -> str:
        return self.subject

    def __reduce__(self):
        return type(self), (self.subject, self.problem, self.fix)


class ConfigError(UserError):
    """A config value that cannot work; the message names the field and the fix."""

    @property
    def field(self) -> str:
        return self.subject

    def _label(self) -> str:
        return f"config field '{self.subject}'"


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The `UserError` behind `exc`: itself, or one that Ray wrapped (task errors keep it as `cause`, Ray Train
    keeps each worker's exception in `worker_failures`, the controller's in `controller_failure`)."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError) and getattr(current, "cause", None) is None:
            return current  # (Ray's task errors subclass the user's error too: read their `cause` instead)
        pending.extend(getattr(current, "worker_failures", {}).values())
        pending.extend(getattr(current, name, None)
                       for name in ("controller_failure", "cause", "__cause__", "__context__"))
    return None
