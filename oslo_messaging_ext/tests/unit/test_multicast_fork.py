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

"""Children forked while a thread of the parent notifies (async mode).

A child inherits the parent's locks in whatever state they were in at
the fork, but none of its threads: the driver must rebuild its locks,
queues and threads in the child before their first use there.
"""

import collections
import os
import signal
import threading
import time

from oslotest import base

from oslo_messaging_ext.tests.unit import test_multicast
from oslo_messaging_ext.tests import utils as test_utils

try:
    from eventlet import patcher
    GREEN = patcher.is_monkey_patched('thread')
except ImportError:
    GREEN = False

# Fewer under eventlet, where each fork costs about half a second.
FORKS = 40 if GREEN else 200
# Threads of the parent notifying while it forks, and a bound on their
# calls, so that a run whose children hang cannot eat the memory.
NOTIFIERS = 1
MAX_CALLS = 500000
# What one child may take to notify and flush on a loaded machine.
CHILD_DEADLINE = 20.0
REPLICAS = {'glance.repl.host1.info', 'glance.repl.host2.info'}


class ForkTestCase(test_multicast.DriverFixtureMixin, base.BaseTestCase):

    def wait_child(self, pid):
        """The child's exit status, or 'hung' past CHILD_DEADLINE."""
        status = []

        def reaped():
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status.append(os.waitstatus_to_exitcode(code))
            return done

        if test_utils.wait_until(reaped, CHILD_DEADLINE):
            return status[0]
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return 'hung'

    def test_children_forked_while_a_thread_notifies_never_hang(self):
        # No lock in the record: a child must not hang in the test's own
        # bookkeeping.
        sent = []
        self.transport._send_notification.side_effect = (
            lambda target, *args, **kwargs: sent.append(target.topic))
        # A child's flush may wait up to half of CHILD_DEADLINE, so that a
        # child slowed down by a loaded machine is not taken for one whose
        # flush cannot end; a hung child is still told apart, by the
        # deadline.
        driver = self.driver(test_multicast.glance_rule(
            async_fanout='true', async_flush_timeout=CHILD_DEADLINE / 2))
        stop = threading.Event()
        self.addCleanup(stop.set)
        calls = []

        def notify_until_stopped():
            envelope = test_multicast.envelope()
            while not stop.is_set() and len(calls) < MAX_CALLS:
                driver.notify({}, dict(envelope), 'INFO', -1)
                calls.append(1)
                if GREEN:
                    # A yield, not a wait: a green thread would otherwise
                    # never let the test run. Native threads do not yield,
                    # so that the driver's locks are busy at the forks.
                    time.sleep(0)

        notifiers = [threading.Thread(target=notify_until_stopped,
                                      daemon=True) for _ in range(NOTIFIERS)]
        for notifier in notifiers:
            notifier.start()
        self.assertTrue(test_utils.wait_until(lambda: len(calls) > 10, 10))

        outcomes = collections.Counter()
        for _ in range(FORKS):
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    if GREEN:
                        # Green threads, unlike native ones, go on in the
                        # child: the parent's notifier would fill this
                        # child's queue, and its flush would never end.
                        stop.set()
                    before = len(sent)
                    driver.notify({}, test_multicast.envelope(), 'INFO', -1)
                    left = driver.flush()
                    replicas = REPLICAS & set(sent[before:])
                    code = 0 if not left and replicas == REPLICAS else 2
                finally:
                    os._exit(code)
            outcomes[self.wait_child(pid)] += 1
        stop.set()
        for notifier in notifiers:
            notifier.join(10)

        # Every child notified, published both replicas and flushed.
        self.assertEqual({0: FORKS}, dict(outcomes))
        self.assertFalse([n for n in notifiers if n.is_alive()])
        # The parent went on replicating meanwhile: every replica of its
        # calls published, or dropped and counted (a full queue).
        self.assertEqual(0, driver.flush())
        self.assertEqual(2 * len(calls), sum(
            sent.count(topic) for topic in REPLICAS) + driver.dropped)
