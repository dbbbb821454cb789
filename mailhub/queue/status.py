"""
The words of the queue's operator actions: what a flush or a removal
answers (L{mailhub.queue.scheduler.Scheduler.flush} and C{remove}), as the
control channel, the queue tool and the HTTP API pass them on.

Owns: these constants only, so that the HTTP API and the queue tool can
name them without importing the scheduler.

Must not touch: anything else; this module imports nothing.
"""

from __future__ import annotations

__all__ = ["REMOVED", "REMOVE_PENDING", "FLUSHED", "HELD"]

#: C{remove}: the message is gone from the queue and the spool.
REMOVED = "removed"
#: C{remove}: the message is being delivered; it is removed when that
#: attempt ends, and the attempt's outcomes are ignored (no notices).
REMOVE_PENDING = "pending"
#: C{flush}: due now (or again as soon as its round in flight ends).
FLUSHED = "flushed"
#: C{flush}: on hold, so not flushed.
HELD = "held"
