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

"""The clean stop of a unix relay (private).

When a process exits or closes its driver, its relay thread takes these
steps, each bounded, before it closes its connections: it relays what its
publishers sent last (a hub), reports what it counted and did not report
yet, hands its queued lines over (up to ``flush_timeout``), gives its
subscribers a second to read what is queued for them, then trims each
queue to the end of the line it has started and gives it one more second,
so that no subscriber is left with a cut line if it reads at all. What is
left at each bound is logged with its size.
"""

import functools
import logging
import time

from oslo_messaging_ext.notify import _unix_log as unix_log

LOG = logging.getLogger(__name__)
_log = functools.partial(unix_log.log, LOG)

# How long a clean stop may wait for its subscribers to read what is
# queued for them.
SUBSCRIBERS_TIMEOUT = 1.0
# After that, how long a subscriber has to read the rest of a line it got
# a part of, so that it never sees a cut line.
LINE_END_TIMEOUT = 1.0


class CleanStop:
    """The deadlines and progress of one clean stop of ``relay``."""

    def __init__(self, relay, flush_timeout):
        self.relay = relay
        now = time.monotonic()
        self.flush_deadline = now + flush_timeout
        self.subscribers_deadline = now + min(flush_timeout,
                                              SUBSCRIBERS_TIMEOUT)
        self.line_end_deadline = self.subscribers_deadline + min(
            flush_timeout, LINE_END_TIMEOUT)
        self._final_read_done = False
        self._lines_trimmed = False

    def step(self, hub, handing_over):
        """One step; return True when the stop is over.

        :param hub: the relay's hub, or None
        :param handing_over: whether lines wait to be handed to the hub
        """
        now = time.monotonic()
        relay = self.relay
        if not self._final_read_done:
            self._final_read_done = True
            if hub is not None:
                hub.read_publishers_once_more()
            self._report_counts(hub)
            handing_over = relay.handing_over()
        if handing_over:
            if now < self.flush_deadline:
                return False
            _log(logging.WARNING, 'Unix notification socket %s: stopped '
                 'before handing over %d queued bytes', relay.path,
                 relay.queued_bytes())
            return True
        behind = hub.subscribers_behind() if hub is not None else []
        if not behind:
            return True
        if now < self.subscribers_deadline:
            return False
        if not self._lines_trimmed:
            self._lines_trimmed = True
            unread = sum(hub.trim_to_line_end(p) for p in behind)
            if unread:
                _log(logging.WARNING, 'Unix notification socket %s: stopped '
                     'with %d notifications its subscribers had not read',
                     relay.path, unread)
            return not any(p.pending for p in behind)
        if now < self.line_end_deadline:
            return False
        _log(logging.WARNING, 'Unix notification socket %s: %d subscribers '
             'did not read the end of their last line; they see it cut',
             relay.path, len(behind))
        return True

    def _report_counts(self, hub):
        """What was counted and not reported yet leaves with the last lines.

        A process that exits while every subscriber's buffer is full would
        otherwise take its count with it.
        """
        outbox = self.relay.outbox
        if hub is None:
            outbox.queue_unsent_notice()
            return
        hub.credit_dropped(outbox.take_unsent() + outbox.take_dropped())
        hub.report_drops(at_stop=True)
