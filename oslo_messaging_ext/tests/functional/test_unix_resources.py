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

"""The unix driver in a service that runs out of file descriptors.

The hub is a real process whose descriptor limit is lowered (prlimit),
then exhausted by subscribers: it cannot accept the next one, which the
kernel queues, and accepts it once descriptors are free again, without
being told.
"""

import json
import os
import resource
import select
import socket

from oslo_messaging_ext.tests.unit import test_unix_driver
from oslo_messaging_ext.tests import utils as test_utils

TIMEOUT = 30.0


class UnixOutOfDescriptorsTestCase(test_unix_driver.UnixTestCase):

    def test_accepting_resumes_once_descriptors_are_free(self):
        notifier, driver = self.notifier(sock_max_subscribers=1000)
        self.assertTrue(test_utils.wait_until(
            lambda: driver.subscribers() == 0, TIMEOUT))
        pid = test_utils.hub_pid(self.sock_path)
        in_use = len(os.listdir('/proc/%d/fd' % pid))
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 8, hard))
        fillers = []
        while len(fillers) < 64:
            sock = socket.socket(socket.AF_UNIX)
            self.addCleanup(sock.close)
            sock.connect(self.sock_path)
            fillers.append(sock)
        # The kernel queues the connections; the hub takes what it can.
        self.assertTrue(test_utils.wait_until(
            lambda: (driver.subscribers() or 0) >= 4, TIMEOUT))
        taken = driver.subscribers()
        self.assertLess(taken, 64)
        last = fillers[-1]
        for sock in fillers[:-1]:
            sock.close()
        self.assertTrue(test_utils.wait_until(
            lambda: driver.subscribers() == 1, TIMEOUT))
        self.assertTrue(test_utils.alive(pid))

        def delivered():
            # Until the hub has accepted it (it may still be counting a
            # closed one).
            notifier.info({}, 'image.upload', {'id': 'after'})
            return select.select([last], [], [], 0.05)[0]

        self.assertTrue(test_utils.wait_until(delivered, TIMEOUT))
        last.settimeout(TIMEOUT)
        with last.makefile('rb') as reader:
            received = json.loads(reader.readline())
        self.assertEqual({'id': 'after'}, received['payload'])
