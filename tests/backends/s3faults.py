"""An S3 transport that fails requests the way a network does, for fault tests.

``S3Backend(..., transport=FaultyTransport)`` makes the backend send every
request through one; :meth:`FaultyTransport.fail_next` then arms faults for
the next one-shot requests the backend judges itself (``S3Transport.attempt``:
conditional writes, writes under a compare-and-swap lease). The errors are
botocore's own, raised where the client would raise them, so the backend's
error map classifies them as it would on a real network:

* :data:`NOT_SENT`: the connection fails before the request leaves (the server
  never sees it);
* :data:`ANSWER_LOST`: the request reaches the server and is applied; its
  answer never arrives (a read timeout).

Arming many faults (more than the backend's attempts) is a server that stays
unreachable. Reads, listings and lock-object writes are never touched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import botocore.exceptions

from apollo_cas.backends.s3.errormap import Outcome
from apollo_cas.backends.s3.transport import S3Transport

NOT_SENT = "not sent"
ANSWER_LOST = "answer lost"


class FaultyTransport(S3Transport):
    """:class:`S3Transport` whose next ``attempt`` requests fail as armed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._armed: list[tuple[str, str]] = []  # (how, what), consumed in order
        self._armed_lock = threading.Lock()
        #: How many faults were injected so far.
        self.injected = 0

    def fail_next(self, times: int, how: str, what: str = "updating") -> None:
        """Make the next ``times`` one-shot requests made while ``what`` (the
        backend's word for the operation: ``"updating"`` a ref) fail ``how``."""
        if how not in (NOT_SENT, ANSWER_LOST):
            raise ValueError(how)
        with self._armed_lock:
            self._armed = [(how, what)] * times

    def _take(self, what: str) -> str | None:
        with self._armed_lock:
            if self._armed and self._armed[0][1] == what:
                self.injected += 1
                return self._armed.pop(0)[0]
        return None

    def attempt(
        self, what: str, key: str, fn: Callable[[], Any]
    ) -> tuple[Outcome, BaseException | None]:
        how = self._take(what)
        if how is None:
            return super().attempt(what, key, fn)
        endpoint = self.place.endpoint or "https://s3.amazonaws.com"

        def faulty() -> Any:
            if how == ANSWER_LOST:
                fn()  # applied by the server...
                raise botocore.exceptions.ReadTimeoutError(endpoint_url=endpoint)  # ...answer lost
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=endpoint)

        return super().attempt(what, key, faulty)
