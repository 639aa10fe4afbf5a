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

The service is a real process whose descriptor limit is lowered, then
exhausted: the hub cannot accept a subscriber, says so, and once
descriptors are free again accepts it, without being told.
"""

import argparse
import json
import logging
import os
import queue
import resource
import select
import subprocess
import sys
import threading
import time

import fixtures
from oslotest import base

from oslo_messaging_ext.tests.functional import unix_helper
from oslo_messaging_ext.tests import utils as test_utils

TIMEOUT = 30.0


def _wait_for_stdin():
    """Wait for input as a service waits for work: its threads run.

    Under eventlet the relay's log records are emitted by a green thread,
    which a blocking read would starve.
    """
    while not select.select([sys.stdin], [], [], 0.1)[0]:
        pass


def exhausted_service(sock_path):
    """Serve ``sock_path``, exhaust descriptors, free them when told.

    Talks on stdin/stdout: prints "exhausted", waits for a line, frees
    every descriptor it took, waits for a subscriber, notifies, prints
    "sent", then waits for stdin to close.
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    notifier, driver = unix_helper.make_notifier(argparse.Namespace(
        sock_path=sock_path, buffer_size=4 * 1024 * 1024))
    if not test_utils.wait_until(lambda: driver.subscribers() == 0,
                                 TIMEOUT):
        sys.exit('the relay never served the socket')
    in_use = [int(fd) for fd in os.listdir('/proc/self/fd')]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(in_use) + 16, hard))
    fillers = []
    while True:
        try:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    print('exhausted', flush=True)
    _wait_for_stdin()
    sys.stdin.readline()
    for fd in fillers:
        os.close(fd)
    if not test_utils.wait_until(lambda: driver.subscribers() == 1,
                                 TIMEOUT):
        sys.exit('the hub never accepted the subscriber')
    notifier.info({}, 'image.upload', {'id': 'after'})
    print('sent', flush=True)
    _wait_for_stdin()
    sys.stdin.read()
    driver.close()


class UnixOutOfDescriptorsTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.sock_path = os.path.join(
            self.useFixture(fixtures.TempDir()).path, 'notifications.sock')

    def stderr_lines(self, proc):
        """A queue of the service's stderr lines, read as they come."""
        lines = queue.Queue()

        def read():
            for line in proc.stderr:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        return lines

    def wait_for_stderr(self, lines, fragment, seen):
        deadline = time.monotonic() + TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(0.0, remaining))
            except queue.Empty:
                line = None
            if line is None:
                self.fail('the service never said %r; stderr: %s'
                          % (fragment, ''.join(seen)))
            seen.append(line)
            if fragment in line:
                return

    def test_accepting_resumes_once_descriptors_are_free(self):
        script = ('import sys; from %s import exhausted_service; '
                  'exhausted_service(sys.argv[1])' % __name__)
        proc = subprocess.Popen(
            [sys.executable, '-c', script, self.sock_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        stderr, seen = self.stderr_lines(proc), []
        self.assertEqual('exhausted\n', proc.stdout.readline(),
                         ''.join(seen))
        # The kernel queues the connection; the hub cannot take it.
        subscriber = test_utils.subscribe_when_listening(
            self, self.sock_path, TIMEOUT)
        subscriber.settimeout(TIMEOUT)
        self.wait_for_stderr(stderr, 'accept failed: [Errno 24]', seen)
        proc.stdin.write('free\n')
        proc.stdin.flush()
        self.assertEqual('sent\n', proc.stdout.readline(), ''.join(seen))
        with subscriber.makefile('rb') as reader:
            received = json.loads(reader.readline())
        self.assertEqual({'id': 'after'}, received['payload'])
        proc.stdin.close()
        self.assertEqual(0, proc.wait(TIMEOUT), ''.join(seen))
