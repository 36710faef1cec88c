"""Real manager + proxy processes on a temp base dir, for integration tests: the harness's
:class:`dsproxy.testing.daemons.Daemons` (and :func:`~dsproxy.testing.daemons.wait_for`)."""

from dsproxy.testing.daemons import Daemons, wait_for

__all__ = ["Daemons", "wait_for"]
