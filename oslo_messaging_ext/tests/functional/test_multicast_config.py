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

"""The standard-topic guard on the real RabbitMQ.

Each configuration below used to load, and the standard consumers (or
the target's) then received every replica as a duplicate: the broker
binds queues by name within a virtual host, whatever the URL's spelling
or the exchange. They are now refused at load, which turns replication
off and leaves the standard notifications as they are.
"""

import urllib.parse

from oslo_messaging_ext import samples
from oslo_messaging_ext.tests.functional import base
from oslo_messaging_ext.tests.functional import test_multicast

COUNT = 3


def other_spellings(url):
    """URLs of the broker of ``url``, spelled otherwise."""
    parsed = urllib.parse.urlsplit(url)
    credentials = parsed.netloc.rpartition('@')[0]
    port = parsed.port or 5672
    host = parsed.hostname
    vhost = parsed.path
    spellings = {
        'no trailing slash': f'rabbit://{credentials}@{host}:{port}'
                             f'{vhost.rstrip("/")}',
        'vhost spelled %2F': f'rabbit://{credentials}@{host}:{port}/%2F'
                             if vhost in ('', '/') else None,
        'multi-host URL': f'rabbit://{credentials}@{host}:{port},'
                          f'{credentials}@192.0.2.1:{port}{vhost or "/"}',
    }
    if port == 5672:
        spellings['no port'] = f'rabbit://{credentials}@{host}{vhost or "/"}'
    if host in ('127.0.0.1', 'localhost'):
        other = 'localhost' if host == '127.0.0.1' else '127.0.0.1'
        spellings['localhost'] = (f'rabbit://{credentials}@{other}:{port}'
                                  f'{vhost or "/"}')
    return {name: spelling for name, spelling in spellings.items()
            if spelling}


class StandardTopicGuardTestCase(test_multicast.MulticastBrokerTestCase):

    def send(self, notifier):
        for _ in range(COUNT):
            notifier.info({}, 'image.upload', samples.glance_upload_payload())
        # Last, so that assertNoMore proves nothing came after the rest.
        notifier.info({}, 'image.upload', base.sentinel_payload())

    def test_other_spellings_of_the_same_broker(self):
        for name, url in sorted(other_spellings(self.url).items()):
            with self.subTest(name):
                standard = base.unique_name('notifications')
                self.load_config("""
                    [oslo_messaging_notifications]
                    driver = messaging-multicast
                    topics = %(standard)s
                    [oslo_messaging_multicast]
                    rules = loop
                    [multicast_rule_loop]
                    selector = *
                    targets = %(standard)s
                    transport_url = %(url)s
                    """ % {'standard': standard, 'url': url})
                collector = self.start_listener(standard)
                notifier, driver = self.notifier()
                self.assertIn('is a standard notification topic on the same '
                              'broker', str(driver.config_error), name)

                self.send(notifier)

                self.assertNoMore(collector, COUNT)

    def test_one_topic_under_two_exchanges(self):
        standard = base.unique_name('notifications')
        topic = base.unique_name('tt')
        exchange = base.unique_name('otherx')
        self.load_config("""
            [oslo_messaging_notifications]
            driver = messaging-multicast
            topics = %(standard)s
            [oslo_messaging_multicast]
            rules = twice
            [multicast_rule_twice]
            selector = *
            targets = %(topic)s, %(exchange)s/%(topic)s
            """ % {'standard': standard, 'topic': topic,
                   'exchange': exchange})
        standard_collector = self.start_listener(standard)
        target_collector = self.start_listener(topic)
        notifier, driver = self.notifier()
        self.assertIn('is also a target under another exchange',
                      str(driver.config_error))

        self.send(notifier)

        self.assertNoMore(standard_collector, COUNT)
        # Replication is off: not even the sentinel is replicated, and by
        # the time the standard one arrived every replica would have been
        # sent (synchronously, before the next standard notification).
        self.assertEqual([], target_collector.received)

    def test_dollar_in_a_rule_password_keeps_the_standard_flowing(self):
        # oslo.config reads "$word1" as the option word1: a load error
        # naming the option, the password masked; the standard
        # notifications still reach the real broker.
        standard = base.unique_name('notifications')
        target = base.unique_name('tt')
        self.load_config("""
            [oslo_messaging_notifications]
            driver = messaging-multicast
            topics = %(standard)s
            [oslo_messaging_multicast]
            rules = dollar
            [multicast_rule_dollar]
            selector = *
            targets = %(target)s
            transport_url = rabbit://replicator:Pa$word1@127.0.0.1:5672/
            """ % {'standard': standard, 'target': target})
        collector = self.start_listener(standard)
        notifier, driver = self.notifier()
        self.assertIn('[multicast_rule_dollar] transport_url = '
                      'rabbit://replicator:****@127.0.0.1:5672/: '
                      'oslo.config reads "$NAME"', str(driver.config_error))
        self.assertNotIn('Pa$word1', str(driver.config_error))

        self.send(notifier)

        self.assertNoMore(collector, COUNT)
