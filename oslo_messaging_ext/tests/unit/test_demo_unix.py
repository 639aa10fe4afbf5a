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
import subprocess
import sys

from oslotest import base

from oslo_messaging_ext import samples


class UnixDemoTestCase(base.BaseTestCase):

    def test_the_subscriber_prints_every_notification(self):
        # A process of its own, as the command runs: the notifier's driver
        # is closed at exit, as a service's is, and must say nothing then.
        env = dict(os.environ, OSLO_MESSAGING_EXT_EVENTLET='0')
        result = subprocess.run(
            [sys.executable, '-m', 'oslo_messaging_ext.cmd.demo', 'unix',
             '--interval', '0'], capture_output=True, text=True, timeout=60,
            env=env)
        self.assertEqual(0, result.returncode, result.stdout + result.stderr)
        # Not even the warnings of the libraries on import.
        self.assertEqual('', result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual([], [line for line in lines if len(line) > 120])
        expected = [e['event_type']
                    for e in samples.glance_image_notifications()]
        emitted = [line.split()[-1] for line in lines
                   if line.startswith('notifier emits')]
        self.assertEqual(expected, emitted)
        got = [line for line in lines if line.startswith('  subscriber got')]
        self.assertEqual(len(expected), len(got))
        for event_type, line in zip(expected, got):
            self.assertIn(' %s id=' % event_type, line)
            self.assertRegex(line, r' name=\S+ status=\w+$')
        self.assertIn('%d notifications relayed, none lost' % len(expected),
                      lines)
