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

"""oslo-messaging-ext-demo multicast on the real RabbitMQ."""

import re
import urllib.parse

import amqp
import kombu

from oslo_messaging_ext.tests.functional import base
from oslo_messaging_ext.tests.unit import test_demo_multicast


class MulticastDemoOnBrokerTestCase(base.BrokerTestCase):

    def exists(self, declare, name):
        amqp_url = urllib.parse.urlsplit(self.url)._replace(
            scheme='amqp').geturl()
        with kombu.Connection(amqp_url, connect_timeout=5) as conn:
            try:
                declare(conn.channel(), name)
            except amqp.exceptions.NotFound:
                return False
        return True

    def test_runs_and_leaves_nothing_on_the_broker(self):
        result = test_demo_multicast.run_demo('multicast', '--transport-url',
                                              self.url)
        self.assertEqual(0, result.returncode, result.stdout + result.stderr)
        self.assertEqual('', result.stderr)
        self.assertIn('Every notification and replica arrived.',
                      result.stdout)
        suffix = re.search(r'^The suffix (-[0-9a-f]+) is this run',
                           result.stdout, re.M).group(1)
        printed = test_demo_multicast.copies(result.stdout.splitlines())
        self.assertEqual(7, len(printed))
        self.assertIn(('audit%s/images.active%s' % (suffix, suffix),
                       'image.upload', 'image.localhost'), printed[3][1])
        for exchange in ('audit', 'oslo-messaging-ext-demo'):
            self.assertFalse(self.exists(
                lambda ch, n: ch.exchange_declare(n, 'topic', passive=True),
                exchange + suffix), exchange + suffix)
        for topic in ('notifications', 'glance.repl.host1',
                      'glance.repl.host2', 'images.active'):
            self.assertFalse(self.exists(
                lambda ch, n: ch.queue_declare(n, passive=True),
                '%s%s.info' % (topic, suffix)), topic + suffix)
