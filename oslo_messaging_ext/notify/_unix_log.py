#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
#    WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
#    License for the specific language governing permissions and limitations
#    under the License.

"""Logging from the unix relay's native thread (private).

In a process eventlet patched, the logging module's and its handlers'
locks are green: a native thread that takes one while a green thread holds
it hangs the whole process. There the relay thread only appends its
records to a deque (atomic, no lock), and the service's side logs them: on
its next notification, at close, and from a green thread within a second.
Elsewhere records are logged at once.
"""

import collections
import logging
import os
import sys
import time
import traceback

LOG = logging.getLogger(__name__)

# Records the relay thread could not log itself, oldest first.
_deferred_records = collections.deque()
_MAX_DEFERRED_RECORDS = 1000
_deferred_lost = [0]
# The process they were deferred in.
_deferred_pid = [os.getpid()]
_green_drainer_started = [False]
# A repeated warning is logged at most once per this many seconds.
_INTERVAL = 60.0


def logging_is_green():
    patcher = sys.modules.get('eventlet.patcher')
    return patcher is not None and patcher.is_monkey_patched('thread')


def log(logger, level, msg, *args, exc_info=False):
    """Log from the relay thread, never taking a green lock.

    The record names the caller's file and line, not this module's, also
    when it is logged later from the service's side.
    """
    if exc_info:
        msg += '\n%s'
        args += (traceback.format_exc().rstrip(),)
    caller = sys._getframe(1)
    where = (caller.f_code.co_filename, caller.f_lineno,
             caller.f_code.co_name)
    if not logging_is_green():
        _handle(logger, level, msg, args, where)
        return
    if _deferred_pid[0] != os.getpid():
        _forget_deferred_records()
    if len(_deferred_records) < _MAX_DEFERRED_RECORDS:
        _deferred_records.append((logger, level, msg, args, where))
    else:
        _deferred_lost[0] += 1


def _handle(logger, level, msg, args, where):
    if logger.isEnabledFor(level):
        pathname, lineno, func = where
        logger.handle(logger.makeRecord(logger.name, level, pathname, lineno,
                                        msg, args, None, func))


def pending():
    """Whether records wait for emit_deferred_records(); no lock taken."""
    return bool(_deferred_records) or bool(_deferred_lost[0])


def emit_deferred_records():
    """Log what the relay thread handed over; call it on the service side.

    A forked child inherits its parent's records: they are the parent's to
    log, and are forgotten here, even where no at-fork hook ran.
    """
    if _deferred_pid[0] != os.getpid():
        _forget_deferred_records()
        return
    while True:
        try:
            logger, level, msg, args, where = _deferred_records.popleft()
        except IndexError:
            break
        _handle(logger, level, msg, args, where)
    lost, _deferred_lost[0] = _deferred_lost[0], 0
    if lost:
        LOG.warning('Unix notification relay: %d log records were lost '
                    '(more than %d waited to be logged)', lost,
                    _MAX_DEFERRED_RECORDS)


def _forget_deferred_records():
    _deferred_records.clear()
    _deferred_lost[0] = 0
    _deferred_pid[0] = os.getpid()


def start_green_drainer():
    """Log handed-over records within a second, notifications or not."""
    if _green_drainer_started[0] or not logging_is_green():
        return
    _green_drainer_started[0] = True
    eventlet = sys.modules['eventlet']

    def drain_forever():
        while True:
            eventlet.sleep(1.0)
            emit_deferred_records()

    # A forked child inherits this green thread with the rest of the hub.
    eventlet.spawn_n(drain_forever)


os.register_at_fork(after_in_child=_forget_deferred_records)


class Throttle:
    """Say a repeated event at most once per interval, with its count."""

    def __init__(self, interval=_INTERVAL):
        self.interval = interval
        self.total = 0
        self._unsaid = 0
        self._next_at = 0.0

    def hit(self):
        """Count one event; return how many to say now (0: stay quiet)."""
        self.total += 1
        self._unsaid += 1
        now = time.monotonic()
        if now < self._next_at:
            return 0
        self._next_at = now + self.interval
        unsaid, self._unsaid = self._unsaid, 0
        return unsaid
