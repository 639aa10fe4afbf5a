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

"""The messaging-multicast driver on oslo.messaging's fake transport."""

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import fixtures
from oslo_config import cfg
from oslo_config import fixture as config_fixture
from oslo_context import context
import oslo_messaging
from oslo_messaging.notify import messaging
from oslo_utils import timeutils
from oslotest import base

from oslo_messaging_ext.notify import _impl_multicast as multicast
from oslo_messaging_ext.notify import _multicast_config as multicast_config
from oslo_messaging_ext.notify import _multicast_lanes as multicast_lanes
from oslo_messaging_ext.notify import _multicast_rules as multicast_rules
from oslo_messaging_ext import opts as oslo_messaging_ext_opts
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests import utils as test_utils

GLANCE_RULE = """
[oslo_messaging_multicast]
rules = glance_replication
[multicast_rule_glance_replication]
selector = event_type in image.upload,image.delete
targets = glance.repl.host1,glance.repl.host2
publisher_id = GLANCE:MASTER
"""

ONMCAST = """
[DEFAULT]
multicast_events = image.upload,image.delete
multicast_topic_prefix = glance.repl.
publisher_id = GLANCE:MASTER
image.delete = host1,host2
image.upload = host1,host2
"""


def glance_rule(**options):
    """GLANCE_RULE with further [oslo_messaging_multicast] options."""
    extra = ''.join('%s = %s\n' % item for item in sorted(options.items()))
    return GLANCE_RULE.replace('rules = glance_replication\n',
                               'rules = glance_replication\n' + extra)


def envelope(event_type='image.upload', priority='INFO', payload=None,
             publisher_id='image.localhost'):
    """A notification as oslo_messaging.Notifier hands it to drivers."""
    return {'message_id': str(uuid.uuid4()),
            'publisher_id': publisher_id,
            'event_type': event_type,
            'priority': priority,
            'payload': (samples.glance_upload_payload() if payload is None
                        else payload),
            'timestamp': str(timeutils.utcnow())}


class DriverFixtureMixin:
    """A ConfigOpts, a fake transport and a record of what is published."""

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(
            config_fixture.Config(cfg.ConfigOpts())).conf
        self.transport = oslo_messaging.get_notification_transport(
            self.conf, url='fake:/')
        self.addCleanup(self.transport.cleanup)
        # Where a service sets it, and where the driver reads it.
        self.conf.set_override('transport_url', 'fake:/')
        self.published = []
        self._publish_lock = threading.Lock()
        self.fail_topics = set()
        self.useFixture(fixtures.MockPatchObject(
            self.transport, '_send_notification',
            side_effect=self._record))
        self.log = self.useFixture(test_utils.FakeLogger(
            multicast.__name__, level=logging.DEBUG))

    def _record(self, target, ctxt, message, version, retry=None):
        if target.topic in self.fail_topics:
            raise oslo_messaging.MessageDeliveryFailure('broker down')
        with self._publish_lock:
            self.published.append({'topic': target.topic,
                                   'exchange': target.exchange,
                                   'message': dict(message),
                                   'version': version,
                                   'retry': retry,
                                   'ctxt': ctxt})

    def configure(self, text):
        path = os.path.join(self.useFixture(fixtures.TempDir()).path,
                            'service.conf')
        with open(path, 'w') as f:
            f.write(textwrap.dedent(text))
        self.conf(['--config-file', path], project='multicast-test')

    def driver(self, text=None, topics=('notifications',)):
        if text is not None:
            self.configure(text)
        driver = multicast.MulticastDriver(self.conf, list(topics),
                                           self.transport)
        self.addCleanup(driver.cleanup)
        return driver

    def topics(self):
        return [p['topic'] for p in self.published]

    def track_transports(self):
        """Record the URLs of the transports made, and of those cleaned."""
        made, cleaned = [], []
        real = oslo_messaging.get_notification_transport

        def tracking(conf, url=None, **kwargs):
            transport = real(conf, url=url, **kwargs)
            made.append(url)
            self.useFixture(fixtures.MockPatchObject(
                transport, 'cleanup', side_effect=lambda: cleaned.append(url)))
            return transport

        self.useFixture(fixtures.MockPatch(
            'oslo_messaging.get_notification_transport',
            side_effect=tracking))
        return made, cleaned


class SelectorTestCase(base.BaseTestCase):

    payload = {'name': 'cirros', 'size': 1036, 'protected': False,
               'tags': ['gold', 'replicate'],
               'properties': {'os_distro': 'cirros'},
               'locations': [{'url': 'file:///var/lib/glance/x'}]}

    def matches(self, text, ctxt=None, **message):
        message.setdefault('payload', self.payload)
        return multicast_rules.Selector.parse(text).matches(
            envelope(**message), ctxt or {})

    def test_operators_and_their_negation(self):
        cases = [
            ('exact', 'image.upload', 'image.uploads'),
            ('glob', 'image.*', 'compute.*'),
            ('regex', r'^image\.(up|down)load$', r'^image\.delete'),
            ('prefix', 'image.', 'compute.'),
            ('contains', 'upl', 'del'),
            ('in', 'image.delete, image.upload', 'image.delete,x'),
        ]
        for operator, matching, other in cases:
            self.assertTrue(self.matches('event_type %s %s'
                                         % (operator, matching)), operator)
            self.assertFalse(self.matches('event_type %s %s'
                                          % (operator, other)), operator)
            self.assertFalse(self.matches('event_type !%s %s'
                                          % (operator, matching)), operator)
            self.assertTrue(self.matches('event_type !%s %s'
                                         % (operator, other)), operator)

    def test_exact_is_the_default_operator(self):
        self.assertTrue(self.matches('event_type image.upload'))
        self.assertFalse(self.matches('event_type image'))

    def test_value_keeps_its_spaces(self):
        payload = {'name': 'my image'}
        self.assertTrue(self.matches('payload.name exact my image',
                                     payload=payload))
        self.assertTrue(self.matches('payload.name regex ^my im',
                                     payload=payload))

    def test_message_fields(self):
        message = envelope(publisher_id='image.host1')
        for text, expected in [
                ('publisher_id glob image.*', True),
                ('publisher_id exact image.host2', False),
                ('message_id exact %s' % message['message_id'], True),
                ('message_id prefix zzz', False)]:
            self.assertEqual(expected, multicast_rules.Selector.parse(
                text).matches(message, {}), text)

    def test_priority_ignores_case(self):
        self.assertTrue(self.matches('priority info'))
        self.assertTrue(self.matches('priority INFO'))
        self.assertTrue(self.matches('priority in error,info'))
        self.assertTrue(self.matches('priority regex ^inf'))
        self.assertFalse(self.matches('priority info', priority='ERROR'))

    def test_payload_paths(self):
        for text, expected in [
                ('payload.name exact cirros', True),
                ('payload.properties.os_distro exact cirros', True),
                ('payload.properties.missing exact cirros', False),
                ('payload.size exact 1036', True),
                ('payload.protected exact false', True),
                ('payload.locations.0.url prefix file://', True),
                ('payload.locations.7.url prefix file://', False),
                ('payload.tags contains replicate', True),
                ('payload.tags contains silver', False),
                ('payload.tags !contains silver', True),
                ('payload.name.deeper exact x', False)]:
            self.assertEqual(expected, self.matches(text), text)

    def test_missing_field_only_matches_negated(self):
        self.assertFalse(self.matches('payload.nothing exact x'))
        self.assertTrue(self.matches('payload.nothing !exact x'))

    def test_context_from_dict_and_request_context(self):
        ctxt = context.RequestContext(project_id='p1', user_id='u1')
        self.assertTrue(self.matches('context.project_id exact p1', ctxt))
        self.assertFalse(self.matches('context.project_id exact p2', ctxt))
        self.assertTrue(self.matches('context.user in u1,u2',
                                     ctxt.to_dict()))
        self.assertFalse(self.matches('context.project_id exact p1', {}))

    def test_parse_errors(self):
        for text, reason in [
                ('event_type', 'FIELD [OPERATOR] VALUE'),
                ('kind exact x', "unknown field 'kind'"),
                ('payload. exact x', "unknown field 'payload.'"),
                ('payload..a exact x', "unknown field"),
                ('event_type is x', "unknown operator 'is'"),
                ('event_type !!exact x', "unknown operator '!!exact'"),
                ('event_type regex (', 'invalid regex'),
                ('event_type in ,', 'at least one value')]:
            exc = self.assertRaises(ValueError,
                                    multicast_rules.Selector.parse, text)
            self.assertIn(reason, str(exc))

    def test_index_only_positive_exact_and_in_on_event_type(self):
        def indexable(text):
            return multicast_rules.Selector.parse(text).indexable_event_types

        self.assertEqual({'a'}, indexable('event_type exact a'))
        self.assertEqual({'a', 'b'}, indexable('event_type in a, b'))
        self.assertIsNone(indexable('event_type !exact a'))
        self.assertIsNone(indexable('event_type glob a*'))
        self.assertIsNone(indexable('publisher_id exact a'))


class RuleDriverTestCase(DriverFixtureMixin, base.BaseTestCase):

    def test_loaded_said_at_info_once_per_configuration(self):
        self.useFixture(fixtures.MockPatchObject(multicast, '_LOADED',
                                                 set()))
        self.configure(GLANCE_RULE)
        with self.assertLogs(multicast.__name__, logging.DEBUG) as logs:
            for _ in range(3):
                self.driver()
        levels = [r.levelname for r in logs.records
                  if 'messaging-multicast loaded' in r.getMessage()]
        self.assertEqual(['INFO', 'DEBUG', 'DEBUG'], levels)

    def test_loaded_by_notifier_through_entry_point(self):
        self.configure(GLANCE_RULE)
        notifier = oslo_messaging.Notifier(
            self.transport, publisher_id='image.localhost',
            driver='messaging-multicast', topics=['notifications'])
        # Replicas are what only this driver sends: it was loaded.
        notifier.info({}, 'image.upload', {'id': 'x'})
        self.assertEqual(['notifications.info', 'glance.repl.host1.info',
                          'glance.repl.host2.info'], self.topics())

    def test_standard_notification_sent_first_exactly_as_messagingv2(self):
        driver = self.driver(GLANCE_RULE)
        message = envelope()
        driver.notify({}, dict(message), 'INFO', -1)
        ours = self.published[0]
        del self.published[:]
        messaging.MessagingV2Driver(
            self.conf, topics=['notifications'],
            transport=self.transport).notify({}, dict(message), 'INFO', -1)
        self.assertEqual(self.published[0], ours)
        self.assertEqual(2.0, ours['version'])

    def test_flush_without_async_fanout_is_a_no_op(self):
        driver = self.driver(GLANCE_RULE)
        self.assertEqual(0, driver.flush())
        self.assertEqual(0, driver.dropped)

    def test_standard_message_format_1_0(self):
        driver = self.driver(glance_rule(standard_message_format='1.0'))
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual([1.0, 2.0, 2.0],
                         [p['version'] for p in self.published])

    def test_glance_contract_example(self):
        driver = self.driver(GLANCE_RULE)
        ctxt = {'request_id': 'req-1'}
        for original in samples.glance_image_notifications():
            driver.notify(ctxt, dict(original), original['priority'], -1)
        replicas = [p for p in self.published
                    if p['topic'] != 'notifications.info']
        self.assertEqual(6, len(self.published) - len(replicas))
        self.assertEqual(['glance.repl.host1.info', 'glance.repl.host2.info'],
                         [r['topic'] for r in replicas])
        upload = [n for n in samples.glance_image_notifications()
                  if n['event_type'] == 'image.upload'][0]
        for replica in replicas:
            self.assertEqual(dict(upload, publisher_id='GLANCE:MASTER'),
                             replica['message'])
            self.assertIsNone(replica['exchange'])
            self.assertEqual(2.0, replica['version'])
            self.assertEqual(ctxt, replica['ctxt'])

    def test_transport_keys_of_an_earlier_send_not_replicated(self):
        driver = self.driver(GLANCE_RULE)
        original = envelope()
        sent_before = dict(original, _unique_id='u', _context_user='admin')
        driver.notify({}, sent_before, 'INFO', -1)
        self.assertEqual(dict(original, publisher_id='GLANCE:MASTER'),
                         self.published[1]['message'])

    def test_replica_keeps_publisher_id_unless_configured(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = keep
            [multicast_rule_keep]
            selector = *
            targets = audit/copies
            replica_retry = 4
            """)
        driver.notify({}, envelope(priority='WARN'), 'WARN', 3)
        replica = self.published[1]
        self.assertEqual('image.localhost',
                         replica['message']['publisher_id'])
        # The standard notification keeps the notifier's retry; replicas
        # use their rule's.
        self.assertEqual(3, self.published[0]['retry'])
        self.assertEqual(('audit', 'copies.warn', 4),
                         (replica['exchange'], replica['topic'],
                          replica['retry']))

    def test_all_selectors_of_a_rule_must_match(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = big_uploads
            [multicast_rule_big_uploads]
            selector = event_type exact image.upload
            selector = payload.size regex ^[0-9]{4,}$
            targets = big
            """)
        driver.notify({}, envelope(payload={'size': 1036}), 'INFO', -1)
        driver.notify({}, envelope(payload={'size': 10}), 'INFO', -1)
        driver.notify({}, envelope('image.delete', payload={'size': 1036}),
                      'INFO', -1)
        self.assertEqual(1, self.topics().count('big.info'))

    def test_any_rule_fires_and_each_target_once(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = uploads, infos, everything
            [multicast_rule_uploads]
            selector = event_type exact image.upload
            targets = shared, uploads
            [multicast_rule_infos]
            selector = priority exact info
            targets = shared, x/other, infos
            [multicast_rule_everything]
            selector = publisher_id glob *
            targets = uploads
            """)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(
            [('notifications.info', None), ('shared.info', None),
             ('uploads.info', None), ('other.info', 'x'),
             ('infos.info', None)],
            [(p['topic'], p['exchange']) for p in self.published])
        del self.published[:]
        driver.notify({}, envelope('image.delete', priority='ERROR'),
                      'ERROR', -1)
        self.assertEqual(['notifications.error', 'uploads.error'],
                         self.topics())

    def test_dedup_keeps_the_first_rule_publisher_id(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = first, second
            [multicast_rule_first]
            selector = *
            targets = t
            publisher_id = FIRST
            [multicast_rule_second]
            selector = *
            targets = t
            publisher_id = SECOND
            """)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(['FIRST'], [p['message']['publisher_id']
                                     for p in self.published[1:]])

    def test_rules_indexed_by_event_type(self):
        rules = ''.join('[multicast_rule_r%d]\nselector = event_type exact '
                        'service%d.event\ntargets = t%d\n' % (i, i, i)
                        for i in range(100))
        driver = self.driver('[oslo_messaging_multicast]\nrules = %s\n%s'
                             % (','.join('r%d' % i for i in range(100)),
                                rules))
        self.assertEqual([], driver._unindexed)
        evaluated = []
        self.useFixture(fixtures.MockPatchObject(
            multicast_rules.Rule, 'matches', autospec=True,
            side_effect=lambda rule, n: evaluated.append(rule.name) or 1))
        driver.notify({}, envelope('service42.event'), 'INFO', -1)
        driver.notify({}, envelope('image.upload'), 'INFO', -1)
        self.assertEqual(['r42'], evaluated)
        self.assertEqual(['notifications.info', 't42.info',
                          'notifications.info'], self.topics())

    def test_failing_target_is_isolated_and_logged(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = *
            targets = broken, fine
            """)
        self.fail_topics.add('broken.info')
        for _ in range(3):
            driver.notify({}, envelope(), 'INFO', 0)
        self.assertEqual(['notifications.info', 'fine.info'] * 3,
                         self.topics())
        # Tried once, then skipped while its circuit breaker is open.
        attempts = [call for call in
                    self.transport._send_notification.call_args_list
                    if call.args[0].topic == 'broken.info']
        self.assertEqual(1, len(attempts))
        self.assertEqual(3, driver.dropped)
        errors = [line for line in self.log.output.splitlines()
                  if 'dropped' in line]
        self.assertEqual(1, len(errors))
        self.assertIn('dropped 1 replicas of rule r to target broken',
                      errors[0])
        self.assertIn('MessageDeliveryFailure: broker down', errors[0])

    def test_failures_logged_at_error_once_per_interval(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = *
            targets = broken
            """)
        self.fail_topics.add('broken.info')
        with self.assertLogs(multicast.__name__, logging.ERROR) as logs:
            for _ in range(5):
                driver.notify({}, envelope(), 'INFO', 0)
        self.assertEqual(1, len(logs.records))
        destination = driver._rules[0].destinations[0]
        self.assertEqual(5, destination.failures.total)

    def test_broken_standard_send_does_not_stop_replicas(self):
        driver = self.driver(GLANCE_RULE)
        self.fail_topics.add('notifications.info')
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(['glance.repl.host1.info', 'glance.repl.host2.info'],
                         self.topics())

    def test_one_transport_per_distinct_url(self):
        made, _ = self.track_transports()
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = a, b, c, d
            [multicast_rule_a]
            selector = *
            targets = t
            transport_url = fake://region2/
            [multicast_rule_b]
            selector = *
            targets = t
            transport_url = fake://region2/
            [multicast_rule_c]
            selector = *
            targets = t
            transport_url = fake://region3/
            [multicast_rule_d]
            selector = *
            targets = t
            transport_url = fake:/
            """)
        self.assertEqual(['fake://region2/', 'fake://region3/'], made)
        transports = [r.destinations[0].transport for r in driver._rules]
        self.assertIs(transports[0], transports[1])
        self.assertIsNot(transports[0], transports[2])
        self.assertIs(self.transport, transports[3])


class ValidationTestCase(DriverFixtureMixin, base.BaseTestCase):

    def assertConfigError(self, text, *expected, topics=('notifications',)):
        exc = self.driver(text, topics).config_error
        self.assertIsInstance(exc, multicast_config.MulticastConfigError)
        for part in expected:
            self.assertIn(part, str(exc))
        return exc

    def test_invalid_regex(self):
        self.assertConfigError(
            """
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = payload.name regex (unclosed
            targets = t
            """, '[multicast_rule_r] selector = payload.name regex (unclosed',
            'invalid regex')

    def test_unknown_field_and_operator_reported_together(self):
        exc = self.assertConfigError(
            """
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = colour exact red
            selector = event_type like image.%
            targets = t
            """, '[multicast_rule_r] selector = colour exact red',
            "unknown field 'colour'",
            '[multicast_rule_r] selector = event_type like image.%',
            "unknown operator 'like'")
        self.assertEqual(2, len(exc.problems))

    def test_rule_and_onmcast_problems_reported_together(self):
        exc = self.assertConfigError(
            """
            [DEFAULT]
            multicast_events = image.upload
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = *
            targets = a/b/c
            """, "[multicast_rule_r] targets = a/b/c",
            "[DEFAULT] image.upload = : event key")
        self.assertEqual(2, len(exc.problems))

    def test_contradictory_event_types_warned(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = never
            [multicast_rule_never]
            selector = event_type exact a
            selector = event_type in b,c
            targets = t
            """)
        self.assertIn('rule never can never match', self.log.output)
        driver.notify({}, envelope('a'), 'INFO', -1)
        self.assertEqual(['notifications.info'], self.topics())

    def test_rule_without_targets(self):
        self.assertConfigError(
            """
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = event_type exact a
            """, '[multicast_rule_r] targets = : a rule needs at least one')

    def test_duplicate_and_undefined_rules(self):
        self.assertConfigError(
            """
            [oslo_messaging_multicast]
            rules = r, ghost, r
            [multicast_rule_r]
            selector = *
            targets = t
            """, "[oslo_messaging_multicast] rules = r,ghost,r: rule 'r' is "
            "listed twice", "rule 'ghost' is not defined: there is no "
            "[multicast_rule_ghost] group")

    def test_unparsable_targets(self):
        for target in ('a/b/c', '/topic', 'exchange/', 'two words'):
            self.assertConfigError(
                """
                [oslo_messaging_multicast]
                rules = r
                [multicast_rule_r]
                selector = *
                targets = %s
                """ % target, "[multicast_rule_r] targets = %s: target %r "
                "is not TOPIC or EXCHANGE/TOPIC" % (target, target))

    def test_standard_topic_on_same_transport_rejected(self):
        for target in ('notifications', 'other/notifications'):
            self.assertConfigError(
                """
                [oslo_messaging_multicast]
                rules = loop
                [multicast_rule_loop]
                selector = *
                targets = %s
                """ % target, '[multicast_rule_loop] targets = %s' % target,
                "topic 'notifications' is a standard notification topic",
                'every standard consumer would receive duplicates')

    def test_standard_topic_allowed_on_another_broker(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = region2
            [multicast_rule_region2]
            selector = *
            targets = notifications
            transport_url = fake://region2/
            """)
        self.assertIsNot(self.transport,
                         driver._rules[0].destinations[0].transport)

    def test_invalid_transport_url_hides_secret(self):
        exc = self.assertConfigError(
            """
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = *
            targets = t
            transport_url = nosuchdriver://user:s3cret@host/
            """, '[multicast_rule_r] transport_url = '
                 'nosuchdriver://user:****@host/: invalid transport URL')
        self.assertNotIn('s3cret', str(exc))

    def test_invalid_rule_name(self):
        self.assertConfigError(
            """
            [oslo_messaging_multicast]
            rules = bad name
            """, "rule name 'bad name' may only hold")

    def test_onmcast_event_without_targets(self):
        self.assertConfigError(
            """
            [DEFAULT]
            multicast_events = image.upload
            """, '[DEFAULT] image.upload = : event key \'image.upload\' of '
            'multicast_events has no targets')

    def test_onmcast_duplicate_key_and_invalid_target(self):
        exc = self.assertConfigError(
            """
            [DEFAULT]
            multicast_events = image.upload, Image.Upload
            image.upload = host 1
            """, "[DEFAULT] multicast_events = image.upload,Image.Upload: "
            "event key 'image.upload' is empty or listed twice",
            "[DEFAULT] image.upload = host 1: target 'host 1' gives the "
            "invalid topic 'host 1.image.upload'")
        self.assertEqual(2, len(exc.problems))

    def test_onmcast_key_clashing_with_service_option(self):
        self.conf.register_opt(cfg.IntOpt('image.upload', default=3))
        self.assertConfigError(
            """
            [DEFAULT]
            multicast_events = image.upload
            """, '[DEFAULT] image.upload = 3: the service already registered')

    def test_driver_instances_share_a_rule_transport(self):
        # As the Notifiers of one service do: each loads its own driver.
        made, cleaned = self.track_transports()
        first = self.driver("""
            [oslo_messaging_multicast]
            rules = a
            [multicast_rule_a]
            selector = *
            targets = t
            transport_url = fake://region2/
            """)
        second = self.driver()
        self.assertEqual(['fake://region2/'], made)
        self.assertIs(first._rules[0].destinations[0].transport,
                      second._rules[0].destinations[0].transport)
        first.cleanup()
        self.assertEqual([], cleaned)
        second.cleanup()
        self.assertEqual(['fake://region2/'], cleaned)
        # Once released, the next driver makes a new one.
        third = self.driver()
        self.addCleanup(third.cleanup)
        self.assertEqual(['fake://region2/'] * 2, made)
        self.assertIsNot(first._rules[0].destinations[0].transport,
                         third._rules[0].destinations[0].transport)

    def test_error_leaves_no_transport_behind(self):
        _, cleaned = self.track_transports()
        self.assertConfigError(
            """
            [oslo_messaging_multicast]
            rules = ok, bad
            [multicast_rule_ok]
            selector = *
            targets = t
            transport_url = fake://region2/
            [multicast_rule_bad]
            selector = *
            """, 'rule needs at least one target')
        self.assertEqual(['fake://region2/'], cleaned)


class OnmcastCompatibilityTestCase(DriverFixtureMixin, base.BaseTestCase):

    def test_replicas_as_onmcast_sent_them(self):
        driver = self.driver(ONMCAST)
        ctxt = {'request_id': 'req-1'}
        for original in samples.glance_image_notifications():
            driver.notify(ctxt, dict(original), original['priority'], -1)
        driver.notify(ctxt, envelope('image.delete'), 'INFO', -1)
        replicas = [p for p in self.published
                    if p['topic'] != 'notifications.info']
        self.assertEqual(['glance.repl.host1.image.upload.info',
                          'glance.repl.host2.image.upload.info',
                          'glance.repl.host1.image.delete.info',
                          'glance.repl.host2.image.delete.info'],
                         [r['topic'] for r in replicas])
        upload = [n for n in samples.glance_image_notifications()
                  if n['event_type'] == 'image.upload'][0]
        first = replicas[0]
        self.assertEqual((None, 1.0), (first['exchange'], first['version']))
        self.assertEqual(upload, first['message']['payload'])
        self.assertEqual('image.upload', first['message']['event_type'])
        self.assertEqual('GLANCE:MASTER', first['message']['publisher_id'])
        self.assertEqual('INFO', first['message']['priority'])
        self.assertNotEqual(upload['message_id'],
                            first['message']['message_id'])
        self.assertEqual(ctxt, first['ctxt'])

    def test_key_matches_other_fields_ignoring_case(self):
        driver = self.driver("""
            [DEFAULT]
            multicast_events = ERROR, Image.LocalHost
            error = ops
            image.localhost = mirror
            """)
        driver.notify({}, envelope('image.upload', priority='ERROR'),
                      'ERROR', -1)
        self.assertEqual(['notifications.error', 'ops.error.error',
                          'mirror.image.localhost.error'], self.topics())
        self.assertEqual(['error', 'image.localhost'],
                         [p['message']['event_type']
                          for p in self.published[1:]])

    def test_default_publisher_id_is_hostname_multicast(self):
        driver = self.driver("""
            [DEFAULT]
            multicast_events = image.upload
            image.upload = host1
            """)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual('%s-MULTICAST' % socket.gethostname(),
                         self.published[1]['message']['publisher_id'])

    def test_clean_shape(self):
        driver = self.driver(ONMCAST + '[oslo_messaging_multicast]\n'
                             'onmcast_replica_shape = clean\n')
        original = envelope()
        driver.notify({}, dict(original), 'INFO', -1)
        self.assertEqual(['notifications.info', 'glance.repl.host1.info',
                          'glance.repl.host2.info'], self.topics())
        self.assertEqual(dict(original, publisher_id='GLANCE:MASTER'),
                         self.published[1]['message'])
        self.assertEqual(2.0, self.published[1]['version'])

    def test_both_styles_apply_and_clean_shape_dedups(self):
        driver = self.driver(ONMCAST + GLANCE_RULE)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(['notifications.info', 'glance.repl.host1.info',
                          'glance.repl.host2.info',
                          'glance.repl.host1.image.upload.info',
                          'glance.repl.host2.image.upload.info'],
                         self.topics())
        del self.published[:]
        driver = self.driver(
            ONMCAST + glance_rule(onmcast_replica_shape='clean'))
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(['notifications.info', 'glance.repl.host1.info',
                          'glance.repl.host2.info'], self.topics())

    def test_loading_twice_on_one_configuration(self):
        first = self.driver(ONMCAST)
        second = multicast.MulticastDriver(self.conf, ['notifications'],
                                           self.transport)
        self.addCleanup(second.cleanup)
        self.assertEqual(len(first._rules), len(second._rules))
        self.assertEqual(['host1', 'host2'], self.conf['image.upload'])

    def test_event_option_the_service_registered_differently(self):
        self.conf.register_opt(cfg.ListOpt('image.upload', default=['x'],
                                           help='registered by the service'))
        driver = self.driver(ONMCAST)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(['notifications.info',
                          'glance.repl.host1.image.upload.info',
                          'glance.repl.host2.image.upload.info'],
                         self.topics())

    def test_onmcast_and_standard_topic_collision_rejected(self):
        exc = self.driver("""
            [DEFAULT]
            multicast_events = image.upload
            image.upload = x
            """, ['x.image.upload']).config_error
        self.assertIn('[DEFAULT] image.upload = x', str(exc))


class AsyncFanoutTestCase(DriverFixtureMixin, base.BaseTestCase):

    ASYNC = glance_rule(async_fanout='true')

    def test_replicas_published_by_named_daemon_worker(self):
        threads = []
        record = self._record

        def recording_thread(*args, **kwargs):
            threads.append(threading.current_thread())
            return record(*args, **kwargs)

        self._record = recording_thread
        self.transport._send_notification.side_effect = recording_thread
        driver = self.driver(self.ASYNC)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(0, driver.flush())
        self.assertEqual(['notifications.info', 'glance.repl.host1.info',
                          'glance.repl.host2.info'], self.topics())
        self.assertIs(threading.current_thread(), threads[0])
        worker = threads[1]
        self.assertEqual('messaging-multicast-publish', worker.name)
        self.assertTrue(worker.daemon)
        self.assertIs(worker, threads[2])

    def test_overflow_counted_and_queued_flushed_on_cleanup(self):
        driver = self.driver(glance_rule(async_fanout='true',
                                         async_queue_size=3) +
                             'replica_timeout = 60\n')
        release = threading.Event()
        blocked = threading.Event()
        record = self._record

        def slow(target, *args, **kwargs):
            if target.topic != 'notifications.info':
                blocked.set()
                release.wait()
            return record(target, *args, **kwargs)

        self.transport._send_notification.side_effect = slow
        self.addCleanup(release.set)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertTrue(blocked.wait(10))
        # One replica in flight, one queued: room for 2 of the next 6.
        for _ in range(3):
            driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(4, driver.dropped)
        release.set()
        driver.cleanup()
        self.assertEqual(4, self.topics().count('notifications.info'))
        self.assertEqual(4, len(self.published) - 4)
        self.assertEqual(0, driver.flush())

    def test_overflow_logged_once_per_interval(self):
        driver = self.driver(glance_rule(async_fanout='true',
                                         async_queue_size=1))
        release = threading.Event()
        self.addCleanup(release.set)
        self.transport._send_notification.side_effect = (
            lambda target, *a, **k: target.topic == 'notifications.info' or
            release.wait())
        with self.assertLogs(multicast.__name__, logging.ERROR) as logs:
            for _ in range(20):
                driver.notify({}, envelope(), 'INFO', -1)
        # One line per target.
        self.assertEqual(2, len(logs.records))
        self.assertIn('queue of its broker is full (async_queue_size = 1)',
                      logs.output[0])
        self.assertGreaterEqual(driver.dropped, 36)

    def test_replicas_not_deferred_indefinitely_by_a_busy_service(self):
        driver = self.driver(self.ASYNC)
        published = threading.Event()
        record = self._record

        def signal(target, *args, **kwargs):
            record(target, *args, **kwargs)
            if target.topic != 'notifications.info':
                published.set()

        self.transport._send_notification.side_effect = signal
        driver.notify({}, envelope(), 'INFO', -1)
        # A service that never pauses for BUSY_WINDOW: its submissions keep
        # the worker deferring, until the replica has waited MAX_DEFER.
        deadline = time.monotonic() + multicast_lanes.MAX_DEFER + 5
        while not published.is_set() and time.monotonic() < deadline:
            driver._fanout.publish([])
            published.wait(multicast_lanes.BUSY_WINDOW / 5)
        self.assertTrue(published.is_set(),
                        'replica still deferred after %.1f s'
                        % (multicast_lanes.MAX_DEFER + 5))

    def test_flush_timeout_counts_what_is_left(self):
        driver = self.driver(glance_rule(async_fanout='true',
                                         async_flush_timeout=0.2) +
                             'replica_timeout = 60\n')
        release = threading.Event()
        self.addCleanup(release.set)
        record = self._record

        def stuck(target, *args, **kwargs):
            if target.topic != 'notifications.info':
                release.wait()
            return record(target, *args, **kwargs)

        self.transport._send_notification.side_effect = stuck
        driver.notify({}, envelope(), 'INFO', -1)
        # One replica in flight, one queued: neither published.
        self.assertEqual(2, driver.flush())
        self.assertEqual(0, driver.dropped)
        driver.cleanup()
        self.assertEqual(2, driver.dropped)
        self.assertIn('not published within async_flush_timeout = 0.2 s',
                      self.log.output)

    def test_flushed_at_exit_with_threads_and_under_eventlet(self):
        for mode in ('threads', 'eventlet'):
            result = run_service(self, self.ASYNC, mode)
            self.assertEqual(0, result.returncode, result.stderr)
            self.assertEqual("150 ['messaging-multicast-publish']",
                             result.stdout.strip(), mode)


# A service process that sends 50 notifications through the driver and
# exits: argv is its configuration file, "threads" or "eventlet", and
# "record" or "block" (replicas never published).
SERVICE_SCRIPT = textwrap.dedent("""
    import sys
    if sys.argv[2] == 'eventlet':
        import eventlet
        eventlet.monkey_patch()
    import atexit
    import logging
    import threading
    from oslo_config import cfg
    import oslo_messaging
    from oslo_messaging_ext.notify import _impl_multicast

    logging.basicConfig(level=logging.WARNING)
    conf = cfg.ConfigOpts()
    conf(['--config-file', sys.argv[1]])
    transport = oslo_messaging.get_notification_transport(
        conf, url='fake:/')
    seen = []
    never = threading.Event()
    def record(target, ctxt, message, version, retry=None):
        if sys.argv[3] == 'block' and target.topic != 'notifications.info':
            never.wait()
        seen.append((target.topic, threading.current_thread().name))
    transport._send_notification = record
    # atexit runs handlers last in, first out: this one runs after
    # the driver's, which must publish what is still queued.
    atexit.register(lambda: print(len(seen), sorted(set(
        name for topic, name in seen if topic != 'notifications.info'
    ))))
    driver = _impl_multicast.MulticastDriver(
        conf, ['notifications'], transport)
    for _ in range(50):
        driver.notify({}, {'event_type': 'image.upload',
                           'priority': 'INFO', 'payload': {},
                           'publisher_id': 'p', 'message_id': 'm',
                           'timestamp': 't'}, 'INFO', -1)
    """)


def run_service(test, config, mode='threads', sends='record'):
    """Run SERVICE_SCRIPT with ``config``; return the CompletedProcess."""
    path = os.path.join(test.useFixture(fixtures.TempDir()).path,
                        'service.conf')
    with open(path, 'w') as f:
        f.write(textwrap.dedent(config))
    return subprocess.run(
        [sys.executable, '-c', SERVICE_SCRIPT, path, mode, sends],
        capture_output=True, text=True, timeout=60)


class OptsTestCase(base.BaseTestCase):

    def test_rule_group_listed_as_dynamic_group_of_rules(self):
        listed = {getattr(group, 'name', group): (group, opts)
                  for group, opts in oslo_messaging_ext_opts.list_opts()}
        group, opts = listed['multicast_rule_example']
        self.assertEqual('rules', group.dynamic_group_owner)
        self.assertEqual(['selector', 'targets', 'transport_url',
                          'publisher_id', 'replica_timeout', 'replica_retry',
                          'failure_backoff'], [o.name for o in opts])
        self.assertTrue(opts[2].secret)
        self.assertEqual(
            {'rules', 'async_fanout', 'async_queue_size',
             'async_flush_timeout', 'standard_message_format',
             'onmcast_replica_shape'},
            {o.name for o in listed['oslo_messaging_multicast'][1]})
        # DEFAULT is shared: upstream's list_opts has its own options there.
        self.assertEqual(
            set(), {'multicast_events', 'multicast_topic_prefix',
                    'publisher_id'} - {o.name for o in listed[None][1]})
