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

import os
import socket
import subprocess
import sys
import time

from oslotest import base

from oslo_messaging_ext import samples


def run_demo(*args):
    # A process of its own, as the command runs, without the tests'
    # monkey-patching.
    env = dict(os.environ, OSLO_MESSAGING_EXT_EVENTLET='0')
    return subprocess.run(
        [sys.executable, '-m', 'oslo_messaging_ext.cmd.demo'] + list(args),
        capture_output=True, text=True, timeout=120, env=env)


def copies(lines):
    """[(emitted event type, [(listener, event type, publisher)...])]."""
    printed = []
    for line in lines:
        if line.startswith('notifier emits '):
            printed.append((line.split()[2], []))
        elif line.startswith('  -> '):
            printed[-1][1].append(tuple(line.split()[1:2] +
                                        line.split()[2:5:2]))
    return printed


class MulticastDemoTestCase(base.BaseTestCase):

    def test_copies_in_emission_order_and_stderr_is_empty(self):
        result = run_demo('multicast')
        self.assertEqual(0, result.returncode, result.stdout + result.stderr)
        self.assertEqual('', result.stderr)
        lines = result.stdout.splitlines()
        printed = copies(lines)
        self.assertEqual([e['event_type']
                          for e in samples.glance_life_cycle()],
                         [event_type for event_type, _ in printed])
        standard = ('notifications', 'image.localhost')
        active = ('audit/images.active', 'image.localhost')
        host1 = ('glance.repl.host1', 'GLANCE:MASTER')
        host2 = ('glance.repl.host2', 'GLANCE:MASTER')
        self.assertEqual([
            [standard], [standard], [standard],
            [standard, host1, host2, active],
            [standard, active], [standard, active],
            [standard, host1, host2],
        ], [[(c[0], c[2]) for c in received] for _, received in printed])
        for event_type, received in printed:
            self.assertEqual({event_type}, {c[1] for c in received})
        self.assertIn('Every notification and replica arrived.', lines)

    def test_every_topic_is_explained(self):
        lines = run_demo('multicast').stdout.splitlines()
        legend = lines[lines.index('Topics, one listener each:') + 1:][:4]
        self.assertEqual(['notifications', 'glance.repl.host1',
                          'glance.repl.host2', 'audit/images.active'],
                         [line.split()[0] for line in legend])
        self.assertIn('the standard topic', legend[0])
        self.assertIn('rule active_images', legend[3])

    def test_unreachable_broker_fails_fast_with_a_hint(self):
        probe = socket.socket()
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        started = time.monotonic()
        result = run_demo('multicast', '--transport-url',
                          'rabbit://guest:secret@127.0.0.1:%d/' % port)
        self.assertLess(time.monotonic() - started, 30)
        self.assertEqual(1, result.returncode)
        self.assertIn('cannot use the broker at rabbit://guest:****@'
                      '127.0.0.1:%d/' % port, result.stderr)
        self.assertIn('Is RabbitMQ running there', result.stderr)
        self.assertNotIn('secret', result.stderr + result.stdout)
        self.assertNotIn('Traceback', result.stderr)
