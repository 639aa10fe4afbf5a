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

"""Rate-limited, exact reports of what the multicast driver dropped.

A broker outage must not flood the service's log with one line per
notification, yet every ERROR line must carry the true count since the
previous one, and a burst that ends must still be reported: the first
event of a quiet period is logged at once, the following ones are counted
and logged together REPORT_INTERVAL seconds after the previous line.
"""

import logging
import threading
import time

# Logged under the driver's name, so that the level a service sets for the
# driver's logger covers all the driver logs, wherever its code lives.
LOG = logging.getLogger('oslo_messaging_ext.notify._impl_multicast')

REPORT_INTERVAL = 60.0


class Reporter:
    """Counts an event and logs it at most once per REPORT_INTERVAL.

    ``message`` is a %-format with a ``count`` key; the line of a deferred
    report uses the parameters of the latest event.
    """

    def __init__(self, message):
        self.message = message
        self.total = 0
        self._unreported = 0
        self._params = {}
        self._last = None
        self._timer = None
        self._lock = threading.Lock()

    def report(self, params, count=1, now=False):
        """Count ``count`` events; log them unless logged recently.

        :param now: log at once, whatever the interval (at exit: nobody
            would be left to log it later)
        """
        with self._lock:
            self.total += count
            self._unreported += count
            self._params = params
            moment = time.monotonic()
            if (not now and self._last is not None and
                    moment - self._last < REPORT_INTERVAL):
                # A forked child inherits the timer but not its thread.
                if self._timer is None or not self._timer.is_alive():
                    self._timer = threading.Timer(
                        self._last + REPORT_INTERVAL - moment,
                        self._report_deferred)
                    self._timer.daemon = True
                    self._timer.name = 'messaging-multicast-report'
                    self._timer.start()
                return
            line = self._take(moment)
        LOG.error(self.message, line)

    def _take(self, moment):
        line = dict(self._params, count=self._unreported)
        self._unreported = 0
        self._last = moment
        return line

    def _report_deferred(self):
        with self._lock:
            self._timer = None
            if not self._unreported:
                return
            line = self._take(time.monotonic())
        LOG.error(self.message, line)
