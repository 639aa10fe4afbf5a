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

"""What the messaging-multicast configuration refuses, warns about, and
what an invalid one leaves running.
"""

import logging
import os
import random
import textwrap

import fixtures
from oslo_config import cfg
from oslo_config import fixture as config_fixture
import oslo_messaging
from oslotest import base

from oslo_messaging_ext.notify import _impl_multicast as multicast
from oslo_messaging_ext.notify import _multicast_config as multicast_config
from oslo_messaging_ext.notify import _multicast_opts as multicast_opts
from oslo_messaging_ext.tests.unit import test_multicast
from oslo_messaging_ext.tests import utils as test_utils

envelope = test_multicast.envelope

# A closed port: the transports are made, never connected.
STANDARD_URL = 'rabbit://guest:guest@127.0.0.1:1/'


class SameBrokerTestCase(base.BaseTestCase):
    """The standard-topic guard compares what URLs resolve to."""

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(
            config_fixture.Config(cfg.ConfigOpts())).conf
        self.conf([], project='multicast-test')
        self.transport = oslo_messaging.get_notification_transport(
            self.conf, url=STANDARD_URL)
        self.addCleanup(self.transport.cleanup)
        # As a service configures it; the driver reads it there.
        self.conf.set_override('transport_url', STANDARD_URL)
        self.useFixture(test_utils.FakeLogger(multicast.__name__,
                                              level=logging.DEBUG))

    def load(self, url, targets='notifications'):
        multicast_opts.register_opts(self.conf)
        multicast_opts.register_rule_opts(self.conf, 'r')
        self.conf.set_override('rules', ['r'], 'oslo_messaging_multicast')
        self.conf.set_override('selector', ['*'], 'multicast_rule_r')
        self.conf.set_override('targets', targets.split(','),
                               'multicast_rule_r')
        self.conf.set_override('transport_url', url, 'multicast_rule_r')
        driver = multicast.MulticastDriver(self.conf, ['notifications'],
                                           self.transport)
        self.addCleanup(driver.cleanup)
        return driver.config_error

    def test_other_spellings_of_the_standard_broker_refused(self):
        for url in ['rabbit://guest:guest@localhost:1/',
                    'rabbit://guest:guest@127.0.0.1:1',
                    'rabbit://replicator:s3cret@127.0.0.1:1/',
                    'rabbit://guest:guest@127.0.0.1:1/%2F',
                    'rabbit://a:b@nowhere.invalid:1,a:b@LOCALHOST:1/']:
            error = self.load(url)
            self.assertIsNotNone(error, url)
            self.assertIn('[multicast_rule_r] targets = notifications: topic '
                          "'notifications' is a standard notification topic "
                          'on the same broker', str(error))
            self.assertNotIn('s3cret', str(error))

    def test_default_port_is_the_same_broker(self):
        self.conf.set_override('transport_url',
                               'rabbit://guest:guest@127.0.0.1/')
        self.assertIsNotNone(self.load('rabbit://u:p@localhost:5672/'))
        self.assertIsNone(self.load('rabbit://u:p@localhost:5673/'))

    def test_another_vhost_or_node_is_another_broker(self):
        for url in ['rabbit://guest:guest@127.0.0.1:1/region2',
                    'rabbit://guest:guest@127.0.0.1:2/',
                    'rabbit://guest:guest@nowhere.invalid:1/']:
            self.assertIsNone(self.load(url), url)

    def test_same_topic_under_two_exchanges_of_one_broker(self):
        error = self.load('rabbit://guest:guest@localhost:1/', 'tt,otherx/tt')
        self.assertIn("[multicast_rule_r] targets = tt,otherx/tt: topic "
                      "'tt' is also a target under another exchange "
                      '([multicast_rule_r] targets = tt,otherx/tt)',
                      str(error))


def capture_records(test):
    """The driver's log records during ``test``, whatever their level."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(multicast.__name__)
    logger.addHandler(handler)
    test.addCleanup(logger.removeHandler, handler)
    return records


class TargetsTestCase(test_multicast.DriverFixtureMixin, base.BaseTestCase):

    def error(self, text, topics=('notifications',)):
        error = self.driver(text, topics).config_error
        self.assertIsInstance(error, multicast_config.MulticastConfigError)
        return str(error)

    def rule(self, targets, selector='*'):
        return """
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = {}
            targets = {}
            """.format(selector, targets)

    def test_same_topic_under_two_exchanges_refused(self):
        self.assertIn("topic 'tt' is also a target under another exchange",
                      self.error(self.rule('tt,otherx/tt')))
        # Across rules too.
        self.assertIn(
            "[multicast_rule_b] targets = otherx/tt: topic 'tt' is also a "
            "target under another exchange ([multicast_rule_a] targets = tt)",
            self.error("""
                [oslo_messaging_multicast]
                rules = a, b
                [multicast_rule_a]
                selector = *
                targets = tt
                [multicast_rule_b]
                selector = *
                targets = otherx/tt
                """))

    def test_onmcast_topic_under_another_exchange_refused(self):
        self.assertIn(
            # Rules load first.
            "[DEFAULT] image.upload = host1: topic 'glance.repl.host1' is "
            "also a target under another exchange ([multicast_rule_r] "
            "targets = otherx/glance.repl.host1)",
            self.error("""
                [DEFAULT]
                multicast_events = image.upload
                multicast_topic_prefix = glance.repl.
                image.upload = host1
                [oslo_messaging_multicast]
                onmcast_replica_shape = clean
                rules = r
                [multicast_rule_r]
                selector = *
                targets = otherx/glance.repl.host1
                """))

    def test_default_exchange_spelled_out_is_one_target(self):
        # The replica is published once, not once per spelling.
        driver = self.driver(self.rule('tt,openstack/tt'))
        self.assertIsNone(driver.config_error)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(['notifications.info', 'tt.info'], self.topics())

    def test_amqp_wildcards_refused(self):
        for target in ('#', '*', 'x/#', 'a.*.b', 'glance.#'):
            self.assertIn('holds an AMQP wildcard',
                          self.error(self.rule(target)), target)
        self.assertIn(
            "[DEFAULT] image.upload = #: topic 'glance.#.image.upload' holds "
            "an AMQP wildcard", self.error("""
                [DEFAULT]
                multicast_events = image.upload
                multicast_topic_prefix = glance.
                image.upload = #
                """))

    def test_names_over_255_bytes_refused(self):
        longest = 't' * 246
        self.assertIsNone(self.driver(self.rule(longest)).config_error)
        self.assertIn('is longer than 246 bytes',
                      self.error(self.rule(longest + 't')))
        self.assertIn('is longer than 246 bytes',
                      self.error(self.rule('é' * 124)))
        self.assertIn('exchange %r is longer than 255 bytes' % ('x' * 256),
                      self.error(self.rule('x' * 256 + '/t')))

    def test_rule_without_selector_refused(self):
        self.assertIn(
            '[multicast_rule_r] selector = : a rule needs at least one '
            'selector; "selector = *" replicates every notification',
            self.error("""
                [oslo_messaging_multicast]
                rules = r
                [multicast_rule_r]
                selectors = event_type exact image.upload
                targets = t
                """))


class UnknownKeysTestCase(test_multicast.DriverFixtureMixin,
                          base.BaseTestCase):

    def warnings(self):
        return [r.getMessage() for r in self.records
                if r.levelno == logging.WARNING]

    def setUp(self):
        super().setUp()
        self.records = capture_records(self)
        self.useFixture(fixtures.MockPatchObject(multicast, '_LOADED',
                                                 set()))

    def test_typos_warned_once_per_configuration(self):
        text = """
            [DEFAULT]
            multicast_event = image.upload
            image.upload = host1
            [oslo_messaging_multicas]
            rules = r
            [oslo_messaging_multicast]
            rules = r
            rule = s
            [multicast_rule_r]
            selector = *
            selectors = event_type exact image.upload
            targets = t
            [multicast_rule_s]
            selector = *
            targets = u
            """
        driver = self.driver(text)
        self.assertIsNone(driver.config_error)
        expected = [
            "messaging-multicast: [DEFAULT] multicast_event is not an "
            "onmcast option and is ignored (did you mean "
            "'multicast_events'?)",
            "messaging-multicast: [multicast_rule_r] selectors is not an "
            "option of messaging-multicast and is ignored (did you mean "
            "'selector'?)",
            "messaging-multicast: [multicast_rule_s] is ignored: rule 's' "
            "is not listed in [oslo_messaging_multicast] rules",
            "messaging-multicast: [oslo_messaging_multicas] is not a group "
            "of messaging-multicast and is ignored (did you mean "
            "'oslo_messaging_multicast'?)",
            "messaging-multicast: [oslo_messaging_multicast] rule is not an "
            "option of messaging-multicast and is ignored (did you mean "
            "'rules'?)"]
        self.assertEqual(expected, self.warnings())
        # glance builds about 14 Notifiers, each loading the driver.
        self.driver()
        self.assertEqual(expected, self.warnings())

    def test_warnings_kept_when_the_configuration_is_invalid(self):
        error = self.driver("""
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selecter = *
            targets = t
            """).config_error
        self.assertEqual(
            ["[multicast_rule_r] selecter is not an option of "
             "messaging-multicast and is ignored (did you mean "
             "'selector'?)"], error.warnings)

    def test_other_groups_and_service_options_not_warned(self):
        self.driver("""
            [DEFAULT]
            debug = true
            [glance_store]
            stores = file
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = *
            targets = t
            """)
        self.assertEqual([], self.warnings())


class ReplicationOffTestCase(test_multicast.DriverFixtureMixin,
                             base.BaseTestCase):
    """An invalid rule turns replication off, not the notifications."""

    BAD = """
        [oslo_messaging_multicast]
        rules = good, bad
        [multicast_rule_good]
        selector = *
        targets = good
        [multicast_rule_bad]
        selector = payload.name regex ^(?!test-)
        targets = bad
        """

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.MockPatchObject(multicast, '_LOADED',
                                                 set()))
        self.useFixture(fixtures.MockPatchObject(
            multicast_config, '_replication_off', {}))

    def test_standard_notifications_keep_flowing(self):
        self.records = capture_records(self)
        self.configure(self.BAD)
        notifier = oslo_messaging.Notifier(
            self.transport, publisher_id='image.localhost',
            driver='messaging-multicast', topics=['notifications'])
        notifier.info({}, 'image.upload', {'name': 'a' * 40})
        notifier.error({}, 'image.delete', {})
        self.assertEqual(['notifications.info', 'notifications.error'],
                         self.topics())
        self.assertIn(
            'Invalid messaging-multicast configuration, replication is off: '
            "[multicast_rule_bad] selector = payload.name regex ^(?!test-): "
            "regex '^(?!test-)' is refused", self.log.output)
        self.assertIn('The standard notifications are sent as messagingv2 '
                      'sends them', self.log.output)
        self.assertEqual(
            [logging.ERROR], [r.levelno for r in self.records
                              if 'replication is off' in r.getMessage()])

    def test_said_again_at_a_bounded_rate_with_the_count(self):
        clock = [1000.0]
        self.useFixture(fixtures.MockPatch(
            'time.monotonic', side_effect=lambda: clock[0]))
        driver = self.driver(self.BAD)

        def errors():
            return [line for line in self.log.output.splitlines()
                    if 'replication is still off' in line]

        for _ in range(5):
            driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual([], errors())
        clock[0] += multicast_config.REMINDER_INTERVAL
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(1, len(errors()))
        self.assertIn('(6 notifications sent without their replicas since '
                      'the last report)', errors()[0])
        self.assertIn('[multicast_rule_bad] selector', errors()[0])
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(1, len(errors()))
        # The other Notifiers of the service share the reminder.
        other = self.driver()
        other.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(1, len(errors()))
        clock[0] += multicast_config.REMINDER_INTERVAL
        other.notify({}, envelope(), 'INFO', -1)
        self.assertEqual(2, len(errors()))
        self.assertIn('(3 notifications sent', errors()[1])
        self.assertEqual(['notifications.info'] * 9, self.topics())

    def test_invalid_option_values_named_and_standard_kept(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = r
            standard_message_format = 3.0
            async_queue_size = lots
            [multicast_rule_r]
            selector = *
            targets = t
            """)
        self.assertEqual(
            ["[oslo_messaging_multicast] async_queue_size = lots: invalid "
             "value: invalid literal for int() with base 10: 'lots'",
             "[oslo_messaging_multicast] standard_message_format = 3.0: "
             "invalid value: Valid values are [2.0, 1.0], but found '3.0'"],
            driver.config_error.problems)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual([('notifications.info', 2.0)],
                         [(p['topic'], p['version']) for p in self.published])

    def test_legacy_standard_format_kept_when_a_rule_is_invalid(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = r
            standard_message_format = 1.0
            [multicast_rule_r]
            targets = t
            """)
        self.assertIsNotNone(driver.config_error)
        driver.notify({}, envelope(), 'INFO', -1)
        self.assertEqual([('notifications.info', 1.0)],
                         [(p['topic'], p['version']) for p in self.published])


RULE_WITH_URL = """
[oslo_messaging_multicast]
rules = r
[multicast_rule_r]
selector = *
targets = t
transport_url = %s
"""


class DollarTestCase(test_multicast.DriverFixtureMixin, base.BaseTestCase):
    """"$" in values, through real files, as a service loads them.

    oslo.config interpolates every value: "$NAME" and "${NAME}" stand for
    the option NAME, "$$" and "\\$" for a literal "$".
    """

    def setUp(self):
        super().setUp()
        # What was logged before is self.output()[:self.mark].
        self.mark = 0
        self.useFixture(fixtures.MockPatchObject(multicast, '_LOADED',
                                                 set()))
        self.useFixture(fixtures.MockPatchObject(
            multicast_config, '_replication_off', {}))

    def output(self):
        return self.log.output[self.mark:]

    def send(self, text, payloads=({'name': 'x'},)):
        """Configure ``text``, send ``payloads`` as a service does."""
        self.configure(textwrap.dedent("""
            [oslo_messaging_notifications]
            driver = messaging-multicast
            topics = notifications
            """) + textwrap.dedent(text))
        notifier = oslo_messaging.Notifier(self.transport,
                                           publisher_id='image.localhost')
        for payload in payloads:
            notifier.info({}, 'image.upload', payload)

    def assertStandardFlowedAndNamed(self, named, hidden=None):
        self.assertEqual(['notifications.info'], self.topics())
        self.assertIn('Invalid messaging-multicast configuration, '
                      'replication is off: ' + named, self.output())
        self.assertIn('write "$$" for a literal "$"', self.output())
        if hidden:
            self.assertNotIn(hidden, self.output())

    def test_dollar_in_a_rule_broker_password(self):
        self.send(RULE_WITH_URL % 'fake://replicator:Pa$word1@region2:5672/')
        self.assertStandardFlowedAndNamed(
            '[multicast_rule_r] transport_url = '
            'fake://replicator:****@region2:5672/: oslo.config reads',
            hidden='Pa$word1')
        self.assertNotIn('option word1', self.output())

    def test_dollar_in_a_selector_value(self):
        self.send("""
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = payload.name exact $foo
            targets = t
            """)
        self.assertStandardFlowedAndNamed(
            '[multicast_rule_r] selector = payload.name exact $foo: '
            'oslo.config reads "$NAME" and "${NAME}" in a value as the '
            'value of option NAME (no such option foo')

    def test_dollar_in_targets_rules_and_onmcast_options(self):
        for text, named in [
                ("""
                 [oslo_messaging_multicast]
                 rules = r
                 [multicast_rule_r]
                 selector = *
                 targets = t$x
                 """, '[multicast_rule_r] targets = t$x: '),
                ("""
                 [oslo_messaging_multicast]
                 rules = r${x}
                 """, '[oslo_messaging_multicast] rules = r${x}: '),
                ("""
                 [oslo_messaging_multicast]
                 async_fanout = $yes
                 """, '[oslo_messaging_multicast] async_fanout = $yes: '),
                ("""
                 [DEFAULT]
                 multicast_events = image.upload
                 image.upload = host$x
                 """, '[DEFAULT] image.upload = host$x: ')]:
            with self.subTest(named):
                self.published.clear()
                self.mark = len(self.output())
                self.send(text)
                self.assertStandardFlowedAndNamed(named)

    def test_compiler_errors_are_load_errors(self):
        self.send("""
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = payload.name regex a{99999999999}
            targets = t
            """)
        self.assertEqual(['notifications.info'], self.topics())
        self.assertIn('replication is off: [multicast_rule_r] selector = '
                      'payload.name regex a{99999999999}: ', self.output())

    def test_double_dollar_is_a_literal_dollar_in_a_password(self):
        self.send(RULE_WITH_URL % 'fake://replicator:Pa$$word1@region2:5672/')
        self.assertNotIn('replication is off', self.output())
        self.assertEqual(['notifications.info'], self.topics())
        url = oslo_messaging.TransportURL.parse(
            self.conf, self.conf.multicast_rule_r.transport_url)
        self.assertEqual('Pa$word1', url.hosts[0].password)

    def replicated(self, pattern, names):
        """Which of ``names`` the regex selector ``pattern`` replicates."""
        self.published.clear()
        self.mark = len(self.output())
        self.send("""
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = payload.name regex %s
            targets = t
            """ % pattern, [{'name': name} for name in names])
        self.assertNotIn('replication is off', self.output())
        return [p['message']['payload']['name'] for p in self.published
                if p['topic'] == 't.info']

    def test_dollar_in_regexes(self):
        names = ['x', 'xy', '$HOME', 'a$HOME']
        # "$" before no name is left alone: the end of the value.
        self.assertEqual(['x'], self.replicated('^x$', names))
        # "$$" is a literal "$" for oslo.config: the regex sees ^x$.
        self.assertEqual(['x'], self.replicated('^x$$', names))
        # A regex's literal dollar, spelled so that oslo.config leaves it.
        for pattern in (r'^[$]HOME', r'^\x24HOME', r'^\\$HOME'):
            self.assertEqual(['$HOME'], self.replicated(pattern, names),
                             pattern)
            self.assertNotIn('oslo.config reads', self.output())

    def test_backslash_dollar_is_rewritten_and_warned(self):
        # oslo.config reads "\$" as "$": the regex is $HOME, which matches
        # nothing, where the operator meant a literal dollar.
        self.assertEqual([], self.replicated(r'\$HOME', ['$HOME']))
        self.assertIn(r'[multicast_rule_r] selector = payload.name regex '
                      r'\$HOME: oslo.config reads "\$" as a literal "$"',
                      self.output())


class LoadValidationTestCase(test_multicast.DriverFixtureMixin,
                             base.BaseTestCase):
    """What used to load and fail only at publish, or silently."""

    def problems(self, text):
        error = self.driver(text).config_error
        self.assertIsNotNone(error, text)
        return error.problems

    def url_problems(self, url):
        return self.problems(RULE_WITH_URL % url)

    def test_port_out_of_range(self):
        for port in ('99999', '0', '65536'):
            self.assertEqual(
                ['[multicast_rule_r] transport_url = rabbit://u:****@h:%s/: '
                 'port %s is out of range (1-65535)' % (port, port)],
                self.url_problems('rabbit://u:p@h:%s/' % port))

    def test_host_syntax(self):
        problems = self.url_problems('rabbit://u:p@my host:5672/')
        self.assertEqual(1, len(problems), problems)
        self.assertIn("host 'my host' is not a host name", problems[0])
        label = 'a' * 64
        problems = self.url_problems('rabbit://u:p@%s.example.org/' % label)
        self.assertEqual(1, len(problems), problems)
        self.assertIn('has a label longer than 63 characters (%r)' % label,
                      problems[0])

    def test_valid_hosts_accepted(self):
        for host in ('[::1]:5672', '192.0.2.1:5672', 'rabbit-1.example.org',
                     'under_score.example.org', 'a' * 63 + '.example.org'):
            driver = self.driver("""
                [oslo_messaging_multicast]
                rules = r
                [multicast_rule_r]
                selector = *
                targets = t
                transport_url = rabbit://u:p@%s/
                """ % host)
            self.assertIsNone(driver.config_error, host)

    def test_operator_without_value(self):
        for operator in ('regex', '!glob', 'in', 'exact'):
            problems = self.problems("""
                [oslo_messaging_multicast]
                rules = r
                [multicast_rule_r]
                selector = payload.name %s
                targets = t
                """ % operator)
            self.assertEqual(
                ['[multicast_rule_r] selector = payload.name %s: operator '
                 '%r has no value; to select the word itself, write '
                 '"payload.name exact %s"' % (operator, operator, operator)],
                problems)

    def test_standard_sent_twice_warned(self):
        self.driver("""
            [oslo_messaging_notifications]
            driver = messagingv2
            driver = messaging-multicast
            [oslo_messaging_multicast]
            rules = r
            [multicast_rule_r]
            selector = *
            targets = t
            """)
        self.assertIn('[oslo_messaging_notifications] driver = messagingv2,'
                      'messaging-multicast: messaging-multicast and '
                      'messagingv2 both send the standard notification, so '
                      'every consumer receives it twice', self.log.output)

    def test_files_read_once_whatever_the_number_of_rules(self):
        parses = []
        real = cfg.ConfigParser.parse

        def counting(parser):
            parses.append(parser.filename)
            return real(parser)

        self.useFixture(fixtures.MockPatchObject(cfg.ConfigParser, 'parse',
                                                 counting))
        for count in (1, 50):
            del parses[:]
            names = ['r%d' % i for i in range(count)]
            text = '[oslo_messaging_multicast]\nrules = %s\n' % ','.join(
                names) + ''.join(
                '[multicast_rule_%s]\nselector = event_type exact e%s\n'
                'targets = t%s\n' % (name, name, name) for name in names)
            self.configure(text)
            # oslo.config's own parse of the file is before this point.
            del parses[:]
            driver = self.driver()
            self.assertIsNone(driver.config_error)
            self.assertEqual(1, len(parses), count)


class FuzzedConfigurationsTestCase(base.BaseTestCase):
    """Random configurations never stop the standard notifications.

    Each is written to a file and loaded as a service loads it, and a
    notification is sent through the driver (test_check has the check
    tool read the same corpus). Deterministic: the seed is fixed.
    """

    SEED = 22
    # Half random, half a valid configuration with one line changed.
    COUNT = 120

    VALUES = [
        '$x', '${y}', '$$', 'a$$b', r'\$HOME', r'\\$HOME', 'Pa$word1', '$',
        '99999999999999999999', '-1', '0', 'nan', 'inf', '1e400', '0.0001',
        'true', 'false', 'lots', '', ' ', 'ünïcødé', '☃,☃', 'a' * 300,
        'x,y,,z', '1.0', '2.0', '3.0', 'clean', 'onmcast',
        'fake:/', 'fake://u:Pa$$word1@127.0.0.1/', 'fake://u:Pa$word1@h/',
        'rabbit://u:p@127.0.0.1:99999/', 'rabbit://u:p@my host/',
        'rabbit://u:p@%s.invalid/' % ('b' * 64), 'nosuch://h/', '://',
    ]
    SELECTORS = [
        '*', 'event_type exact image.upload', 'event_type in a,$x',
        'payload.name regex a{99999999999}', 'payload.name regex (a',
        'payload.name regex', 'payload.name regex ^x$$', 'payload.² exact 1',
        'context.user exact $u', 'priority !glob *', 'nofield exact 1',
        'payload. exact 1', 'event_type !!exact x', 'payload.size in ',
        'payload.name regex ' + 'a' * 2000, 'publisher_id prefix ü',
    ]
    MAIN_KEYS = ['rules', 'standard_message_format', 'async_fanout',
                 'async_queue_size', 'async_flush_timeout',
                 'onmcast_replica_shape', 'rule', 'ünknown']
    RULE_KEYS = ['targets', 'transport_url', 'publisher_id',
                 'replica_timeout', 'replica_retry', 'failure_backoff',
                 'selectors', 'target']
    DEFAULT_KEYS = ['multicast_events', 'multicast_topic_prefix',
                    'publisher_id', 'image.upload', 'control_exchange',
                    'multicast_event']

    @classmethod
    def corpus(cls):
        """The COUNT configuration texts, the same at every run."""
        rnd = random.Random(cls.SEED)
        for number in range(cls.COUNT):
            yield cls.mutated(rnd) if number % 2 else cls.configuration(rnd)

    @classmethod
    def configuration(cls, rnd):
        lines = ['[oslo_messaging_notifications]',
                 'driver = messaging-multicast', 'topics = notifications',
                 '[DEFAULT]', 'transport_url = fake:/']
        names = rnd.sample(['r1', 'r2', 'r.3', 'bad name', 'r$x', 'ü'],
                           rnd.randint(0, 3))
        for key in rnd.sample(cls.DEFAULT_KEYS, rnd.randint(0, 3)):
            lines.append('{} = {}'.format(key, rnd.choice(
                cls.VALUES + ['image.upload', 'host1,host2'])))
        lines.append('[oslo_messaging_multicast]')
        lines.append('rules = %s' % ','.join(names))
        for key in rnd.sample(cls.MAIN_KEYS[1:], rnd.randint(0, 4)):
            lines.append(f'{key} = {rnd.choice(cls.VALUES)}')
        for name in names + rnd.sample(['unlisted', 'r1'], 1):
            lines.append('[multicast_rule_%s]' % name)
            for _ in range(rnd.randint(0, 3)):
                lines.append('selector = %s' % rnd.choice(cls.SELECTORS))
            lines.append('targets = %s' % rnd.choice(
                ['t1', 't1,x/t2', 'notifications', 'a#b', '/t', 't$x',
                 'ex/' + 'c' * 300, 'ü']))
            for key in rnd.sample(cls.RULE_KEYS[1:], rnd.randint(0, 3)):
                lines.append(f'{key} = {rnd.choice(cls.VALUES)}')
        return '\n'.join(lines) + '\n'

    VALID = [
        '[oslo_messaging_notifications]', 'driver = messaging-multicast',
        'topics = notifications', '[DEFAULT]', 'transport_url = fake:/',
        'multicast_events = image.upload', 'multicast_topic_prefix = repl.',
        'image.upload = host1', '[oslo_messaging_multicast]', 'rules = a,b',
        'async_fanout = false', 'async_queue_size = 100',
        'async_flush_timeout = 1', 'onmcast_replica_shape = clean',
        '[multicast_rule_a]', 'selector = event_type exact image.upload',
        'selector = payload.name regex ^x', 'targets = ta,ex/tb',
        'publisher_id = P', 'replica_timeout = 0.5', 'replica_retry = 0',
        'failure_backoff = 1', '[multicast_rule_b]', 'selector = *',
        'targets = tc', 'transport_url = fake://u:Pa$$word1@127.0.0.1/']

    @classmethod
    def mutated(cls, rnd):
        """VALID with one option line's value or name changed."""
        lines = list(cls.VALID)
        options = [i for i, line in enumerate(lines)
                   if ' = ' in line and not line.startswith('driver')]
        number = rnd.choice(options)
        key, _, value = lines[number].partition(' = ')
        if rnd.random() < 0.2:
            key = rnd.choice(cls.MAIN_KEYS + cls.RULE_KEYS +
                             cls.DEFAULT_KEYS)
        else:
            value = rnd.choice(cls.VALUES + cls.SELECTORS + ['true'])
        lines[number] = f'{key} = {value}'
        return '\n'.join(lines) + '\n'

    def load_and_send(self, path):
        """Topics the fake transport got for one notification."""
        conf = cfg.ConfigOpts()
        transport = oslo_messaging.get_notification_transport(conf,
                                                              url='fake:/')
        self.addCleanup(transport.cleanup)
        conf(['--config-file', path], project='fuzz')
        sent = []
        self.useFixture(fixtures.MockPatchObject(
            transport, '_send_notification',
            side_effect=lambda target, *a, **k: sent.append(target.topic)))
        driver = multicast.MulticastDriver(conf, ['notifications'],
                                           transport)
        try:
            driver.notify({}, envelope(), 'INFO', -1)
            if driver.config_error is None:
                driver.flush()
        finally:
            driver.cleanup()
        return sent, driver.config_error

    def test_fuzzed_configurations(self):
        log = self.useFixture(test_utils.FakeLogger(multicast.__name__,
                                                    level=logging.DEBUG))
        self.useFixture(fixtures.MockPatchObject(multicast, '_LOADED',
                                                 set()))
        directory = self.useFixture(fixtures.TempDir()).path
        counts = {'configurations': 0, 'with $': 0, 'replication off': 0,
                  'standard stopped': 0}
        for number, text in enumerate(self.corpus()):
            path = os.path.join(directory, 'fuzz%d.conf' % number)
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
            counts['configurations'] += 1
            counts['with $'] += '$' in text
            sent, error = self.load_and_send(path)
            counts['replication off'] += error is not None
            if 'notifications.info' not in sent:
                counts['standard stopped'] += 1
            self.assertNotIn('could not be loaded', str(error), text)
        self.assertNotIn('Traceback', log.output)
        self.assertEqual(0, counts['standard stopped'], counts)
        # The corpus exercises what it claims to.
        self.assertGreaterEqual(counts['with $'], 30, counts)
        self.assertGreaterEqual(counts['replication off'], 40, counts)
        # ... and the notify path of loaded configurations.
        self.assertLessEqual(counts['replication off'], self.COUNT - 15,
                             counts)
