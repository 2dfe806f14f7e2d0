"""Errors that end a run for good: raised where a restart from the last checkpoint could only fail again.

A worker raising an :class:`Unrecoverable` error makes the driver end the stage at once with the cause in one
line (:class:`StageFailed`) instead of restarting the worker group ``max_failures`` times; a lost worker or node
is still resumed. This module imports nothing, so the data, train and CLI layers can all share it.
"""

from __future__ import annotations


class Unrecoverable(RuntimeError):
    """A worker error that a restart would repeat: bad data beyond the limit, no usable sample, the NaN limit,
    a changed world size."""


class StageFailed(RuntimeError):
    """A stage ended by an :class:`Unrecoverable` error on a worker; the message is one line naming the cause."""
