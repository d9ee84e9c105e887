"""Exit codes: one table, at the edge where errors leave the program.

The rule: 2 means the command line itself is wrong (an unknown option, a
value that cannot be read, a name that is not allowed) and retrying it
unchanged can never work; 1 means the command was well formed but the world
said no (a ref that names nothing, a refusal because of what the store holds,
a source that cannot be read, an I/O error). Scripts can tell "fix the cron
line" from "look at the store" by the code alone. The help text
(``cli/main.py``) and the README list the same codes.
"""

from __future__ import annotations

from ..errors import ApolloError, DamageFound, InvalidName, Refused, UsageError

OK = 0
ERROR = 1
USAGE = 2
DAMAGE = 3
INTERRUPTED = 130  # SIGINT, as shells report it
TERMINATED = 143  # SIGTERM

#: Most specific class first; the first match decides.
TABLE: list[tuple[type[ApolloError], int, str]] = [
    (DamageFound, DAMAGE, "verify found damaged or missing objects"),
    (Refused, ERROR, "refused because of what the store holds (a tag, a series' latest)"),
    (InvalidName, USAGE, "a name that is not allowed (tag, series, ref syntax)"),
    (UsageError, USAGE, "the command line is wrong (option, value, missing argument)"),
    (ApolloError, ERROR, "anything else: not found, unreadable source, I/O, locks"),
]


def code_for(exc: ApolloError) -> int:
    """The exit code of an error, from :data:`TABLE`."""
    for cls, code, _ in TABLE:
        if isinstance(exc, cls):
            return code
    return ERROR
