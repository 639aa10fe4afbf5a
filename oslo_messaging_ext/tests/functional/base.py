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

"""Plumbing for functional tests against a real RabbitMQ.

The broker is reached through oslo.messaging's own rabbit driver. Without a
reachable broker the tests skip, saying how to start one, unless
``OSLO_MESSAGING_EXT_REQUIRE_BROKER`` is true (CI sets it), in which case
they fail: a CI run that silently skipped every broker test would prove
nothing.
"""

import functools
import os
import socket
import threading
import time
import urllib.parse
import uuid

import kombu
from oslo_config import cfg
from oslo_config import fixture as config_fixture
import oslo_messaging
from oslotest import base

from oslo_messaging_ext.tests import utils as test_utils

DEFAULT_TRANSPORT_URL = 'rabbit://guest:guest@127.0.0.1:5672/'
TRANSPORT_URL_ENV = 'OSLO_MESSAGING_EXT_TRANSPORT_URL'
REQUIRE_BROKER_ENV = test_utils.REQUIRE_ENV

# Long enough for a loaded CI machine, short enough that a lost message
# fails the test in reasonable time.
DELIVERY_TIMEOUT = 30.0

PRIORITIES = ('audit', 'debug', 'info', 'warn', 'error', 'critical', 'sample')


def transport_url():
    return os.environ.get(TRANSPORT_URL_ENV) or DEFAULT_TRANSPORT_URL


@functools.cache
def broker_unreachable_reason(url):
    """Return why the broker of ``url`` cannot be reached, or None."""
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or '127.0.0.1', parsed.port or 5672
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return ('RabbitMQ is not reachable at %s:%s (%s). Start one with '
                '"rabbitmq-server -detached" (Debian package rabbitmq-server) '
                'or point %s at a broker; set %s=1 to make this a failure.'
                % (host, port, exc, TRANSPORT_URL_ENV, REQUIRE_BROKER_ENV))
    return None


def unique_name(prefix):
    """A topic or exchange name no other test, run or process uses."""
    return f'{prefix}-{uuid.uuid4().hex[:12]}'


SENTINEL_KEY = 'oslo_messaging_ext_test_sentinel'


def sentinel_payload(**fields):
    """The payload of a test's last notification, and ``fields``."""
    return dict(fields, **{SENTINEL_KEY: True})


def is_sentinel(notification):
    """Whether it is a sentinel, or an onmcast replica carrying one."""
    payload = notification['payload']
    if isinstance(payload, dict) and isinstance(payload.get('payload'),
                                                dict):
        payload = payload['payload']
    return isinstance(payload, dict) and payload.get(SENTINEL_KEY) is True


class NotificationCollector:
    """A notification endpoint that records what it receives.

    It has the methods of an oslo.messaging notification endpoint, so it
    stands for a real consumer's endpoint code.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self.received = []

    def _record(self, priority, ctxt, publisher_id, event_type, payload,
                metadata):
        with self._cond:
            self.received.append({'priority': priority,
                                  'publisher_id': publisher_id,
                                  'event_type': event_type,
                                  'payload': payload,
                                  'metadata': metadata,
                                  'ctxt': ctxt})
            self._cond.notify_all()

    audit = functools.partialmethod(_record, 'audit')
    debug = functools.partialmethod(_record, 'debug')
    info = functools.partialmethod(_record, 'info')
    warn = functools.partialmethod(_record, 'warn')
    error = functools.partialmethod(_record, 'error')
    critical = functools.partialmethod(_record, 'critical')
    sample = functools.partialmethod(_record, 'sample')

    def wait_for(self, count, timeout=DELIVERY_TIMEOUT):
        """Wait until at least ``count`` notifications arrived.

        :returns: a copy of what was received by then
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return list(self.received)

    def wait_for_sentinels(self, count, timeout=DELIVERY_TIMEOUT):
        """Wait for ``count`` sentinels; return what came before the last.

        A test sends its sentinel notification after everything else, on
        the same path: a duplicate or a late delivery of what it sent
        before arrives ahead of it. Nothing is returned past the deadline:
        the sentinel is expected.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = [n for n in self.received if is_sentinel(n)]
                if len(seen) >= count:
                    last = self.received.index(seen[count - 1])
                    return [n for n in self.received[:last]
                            if not is_sentinel(n)]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def event_types(self):
        with self._cond:
            return [n['event_type'] for n in self.received]


class BrokerTestCase(base.BaseTestCase):
    """A test case that talks to the real RabbitMQ."""

    def setUp(self):
        super().setUp()
        self.url = transport_url()
        reason = broker_unreachable_reason(self.url)
        if reason:
            test_utils.unavailable(self, reason)
        self.conf = self.useFixture(config_fixture.Config(cfg.ConfigOpts()))
        self.conf.conf([], project='oslo-messaging-ext-functional')
        self.transport = self.notification_transport(self.url)
        # Where a service sets it, and where the driver reads it.
        self.conf.config(transport_url=self.url)

    def notification_transport(self, url):
        transport = oslo_messaging.get_notification_transport(
            self.conf.conf, url=url)
        self.addCleanup(transport.cleanup)
        return transport

    def start_listener(self, topic, exchange=None, url=None, pool=None):
        """Listen on ``topic`` and return the collecting endpoint.

        The listener's queues are deleted when the test ends, so that runs
        leave nothing on the broker.
        """
        url = url or self.url
        transport = (self.transport if url == self.url
                     else self.notification_transport(url))
        collector = NotificationCollector()
        target = oslo_messaging.Target(topic=topic, exchange=exchange)
        listener = oslo_messaging.get_notification_listener(
            transport, [target], [collector], executor='threading',
            pool=pool)
        listener.start()
        queues = [f'{topic}.{priority}' for priority in PRIORITIES]
        self.addCleanup(self.delete_queues, url, queues + [pool] if pool
                        else queues)
        self.addCleanup(listener.wait)
        self.addCleanup(listener.stop)
        return collector

    @staticmethod
    def delete_queues(url, queues):
        """Delete ``queues`` on the broker of ``url`` if they exist."""
        parsed = urllib.parse.urlsplit(url)
        amqp_url = parsed._replace(scheme='amqp').geturl()
        with kombu.Connection(amqp_url, connect_timeout=5) as conn:
            channel = conn.channel()
            for queue in queues:
                channel.queue_delete(queue)
