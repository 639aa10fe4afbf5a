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

"""Selectors: regexes on RE2, the wire view, the match-all selector."""

import datetime
import subprocess
import sys
from unittest import mock
import uuid

import fixtures
from oslo_context import context
from oslotest import base

from oslo_messaging_ext.notify import _multicast_rules as multicast_rules
from oslo_messaging_ext.tests.unit import test_multicast
from oslo_messaging_ext.tests.unit import test_unix_subscriber
from oslo_messaging_ext.tests import utils as test_utils

# Why a pattern is refused, as the load error says it.
LOOKAROUND = 'lookaround'
BACKREFERENCE = 'backreference'
POSSESSIVE = 'possessive'
TOO_LARGE = 'the 128 allowed'
REPEAT_LIMIT = 'RE2 repeats at most 1000 times'

# Patterns that make backtracking engines take seconds to hours on a value
# that almost matches, or that make an automaton large: each with None
# (accepted: RE2 matches it in linear time) or why it is refused.
# Every accepted one is timed, outside the unit tests (their timings would
# prove nothing on a loaded machine), on adversarial values of
# MAX_REGEX_INPUT characters.
ATTACK = [
    # Fixed-count repeats of alternations and optional groups.
    ('^((a|a){2}){11}[!?]', None),
    (r'(\w|\w){12}[!?]', None),
    ('^(a?){22}[!?]', None),
    ('(a?){25}a{25}', None),
    (r'(\w|\w){40}[!?]', None),
    ('((a|aa){3}){8}$', None),
    # Nested and overlapping repetitions.
    ('(a+)+$', None),
    ('(a|aa)+$', None),
    ('(.*a){10}', None),
    ('(a*)*b', None),
    ('((ab)*)+c', None),
    ('(x+x+)+y', None),
    (r'(\w+\s?)+$', None),
    ('^(a|a?)+$', None),
    ('(a|a)*$', None),
    ('^(([a-z])+.)+[A-Z]([a-z])+$', None),
    ('.*a.*b', None),
    ('a*a*a*b', None),
    (r'(\d+)*x', None),
    ('(?:a|b|ab)*c', None),
    ('(.*.*)*x', None),
    ('(((a*)*)*)*!', None),
    (r'^(\S+\s*)+$', None),
    ('(?i)(A|a)*B', None),
    # Automata with many states: RE2's NFA takes over.
    ('(a|b)*a(a|b){20}x', None),
    ('[ab]*a[ab]{40}', None),
    (r'[^x]*é.{10}x', None),
    (r'[\s\S]{10}x', None),
    # Too large a program: matching time grows with its size.
    ('(.*a){20}', TOO_LARGE),
    (r'[^x]*é.{20}x', TOO_LARGE),
    (r'[\s\S]{20}x', TOO_LARGE),
    ('(.*a){1000}', TOO_LARGE),
    (r'(\w|\w){80}[!?]', TOO_LARGE),
    (r'[\s\S]{30}x', TOO_LARGE),
    (r'[\s\S]{500}x', TOO_LARGE),
    ('.{500}.{500}x', TOO_LARGE),
    ('(a?){1000}a{1000}', TOO_LARGE),
    (r'^\p{Lu}+$', TOO_LARGE),
    # Beyond RE2's repetition limit, or read as literal text by RE2.
    ('a{99999999999}', REPEAT_LIMIT),
    ('((a{100}){100})', REPEAT_LIMIT),
    ('x{2000}', REPEAT_LIMIT),
    # Not expressible in linear time.
    (r'(a)\1', BACKREFERENCE),
    (r'(?P<x>a)(?P=x)', BACKREFERENCE),
    ('(?=a)a', LOOKAROUND),
    ('(?!b)a', LOOKAROUND),
    ('(?<=a)b', LOOKAROUND),
    ('(?<!a)b', LOOKAROUND),
    ('(a+)++$', POSSESSIVE),
]

# Patterns operators write in selectors: all accepted, but lookarounds and
# backreferences, refused with why and what to write instead, and a
# length check of a hostname label ({0,62}: 251 RE2 instructions).
COMMON = [
    r'^\d+(\.\d+)?$', r'^(ubuntu|centos|rhel)-\d+(\.\d+)?$', '.*prod.*',
    r'^image\.(upload|delete)$', '^prod-', r'\.qcow2$', '^[a-z0-9-]+$',
    '(?i)^CirrOS', r'ubuntu-2[24]\.04',
    '^(?:[a-f0-9]{8}-(?:[a-f0-9]{4}-){3}[a-f0-9]{12})$',
    r'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$',
    r'^compute\.instance\.(create|delete)\.(start|end)$', r'^image\.',
    r'\.end$', r'^(error|critical)$', r'^[A-Za-z0-9_.-]+$',
    r'^win(dows)?-?(server)?-?20(16|19|22)', '(?i)windows',
    r'^(qcow2|raw|vmdk|vhd|iso)$', r'^[^@]+@[^@]+\.[a-z]{2,}$',
    r'^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}', r'^2026-(0[1-9]|1[0-2])-',
    r'^(10|172\.(1[6-9]|2\d|3[01])|192\.168)\.',
    r'^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$', r'^[a-z][a-z0-9-]{0,30}$',
    r'^(?:[a-z0-9-]+\.)+example\.com$', '^https?://',
    '^.*-(dev|test|staging)$', r'(?i)^(debian|ubuntu)[-_ ]?\d+',
    r'^rhel-?[789](\.\d+)?$', '^[a-f0-9]{32}$', r'\s', r'^\S+$',
    '^(admin|service)$', '^snapshot-.+', '^(active|queued|saving)$',
    '^[0-9]+$', r'.*\.(iso|img)$', '^project-(prod|staging)-[0-9]{3}$',
    '^(?P<distro>[a-z]+)-(?P<version>[0-9.]+)$', '^[[:alpha:]]+$',
    r'\bprod\b', r'^[^\x00-\x1f]+$', r'(?s)^.+$', r'\$HOME',
]
COMMON_REFUSED = [
    ('^(?!test-)', LOOKAROUND), ('foo(?=bar)', LOOKAROUND),
    ('^(?<!x)y', LOOKAROUND), (r'^(\w+)-\1$', BACKREFERENCE),
    (r'^[a-z][a-z0-9-]{0,62}$', TOO_LARGE),
]


class RegexTestCase(base.BaseTestCase):

    def assertRefused(self, pattern, reason):
        exc = self.assertRaises(ValueError, multicast_rules.Selector.parse,
                                'payload.name regex %s' % pattern)
        self.assertIn(repr(pattern), str(exc))
        self.assertIn(reason, str(exc))
        return str(exc)

    def test_attack_corpus_accepted_or_refused_with_its_reason(self):
        self.assertGreaterEqual(len(ATTACK), 30)
        for pattern, reason in ATTACK:
            if reason is None:
                multicast_rules.Selector.parse('payload.name regex %s'
                                               % pattern)
            else:
                self.assertRefused(pattern, reason)

    def test_common_patterns_accepted_but_lookarounds_and_backrefs(self):
        self.assertGreaterEqual(len(COMMON) + len(COMMON_REFUSED), 38)
        for pattern in COMMON:
            multicast_rules.Selector.parse('payload.name regex %s' % pattern)
        for pattern, reason in COMMON_REFUSED:
            self.assertRefused(pattern, reason)

    def test_refusal_says_what_to_write_instead(self):
        self.assertIn('"payload.name !prefix test-"',
                      self.assertRefused('^(?!test-)', LOOKAROUND))
        self.assertIn('write {0,5}', self.assertRefused('a{,5}', 'literal'))
        self.assertIn('\\z', self.assertRefused('x\\Z', 'no \\Z'))
        self.assertIn('missing ]', self.assertRefused('[a', 'RE2 syntax'))

    def test_what_python_re_and_re2_agree_on(self):
        for pattern, value, expected in [
                (r'^\d+(\.\d+)?$', '22.04', True),
                (r'^\d+(\.\d+)?$', '22.', False),
                (r'^(ubuntu|centos|rhel)-\d+(\.\d+)?$', 'rhel-9.4', True),
                ('.*prod.*', 'my-prod-image', True),
                ('.*prod.*', 'staging', False),
                ('(?i)^CirrOS', 'cirros-0.6', True),
                (r'\$HOME', '$HOME/x', True),
                ('^x$', 'x', True),
                # Searched anywhere, as re.search does.
                ('prod', 'my-prod', True),
                # Non-ASCII values are matched by character.
                ('^é.$', 'éa', True),
                ('^((a|a){2}){11}[!?]', 'a' * 22 + '!', True),
                ('^((a|a){2}){11}[!?]', 'a' * 1000, False)]:
            selector = multicast_rules.Selector.parse(
                'payload.name regex %s' % pattern)
            self.assertIs(expected, selector.matches(
                {'payload': {'name': value}}), (pattern, value))

    def test_priority_regex_ignores_case(self):
        selector = multicast_rules.Selector.parse('priority regex ^inf')
        self.assertTrue(selector.matches({'priority': 'INFO'}))
        self.assertFalse(selector.matches({'priority': 'ERROR'}))

    def test_longer_values_never_match_a_regex(self):
        limit = multicast_rules.MAX_REGEX_INPUT
        selector = multicast_rules.Selector.parse('payload.name regex ^a')
        negated = multicast_rules.Selector.parse('payload.name !regex ^a')
        for size, expected in ((limit, True), (limit + 1, False)):
            message = {'payload': {'name': 'a' * size}}
            self.assertIs(expected, selector.matches(message, {}))
            self.assertIs(not expected, negated.matches(message, {}))


class WithoutRE2TestCase(test_multicast.DriverFixtureMixin,
                         base.BaseTestCase):
    """google-re2 is an extra: a regex selector without it."""

    def setUp(self):
        super().setUp()
        # A None entry makes "import re2" raise ImportError.
        patcher = mock.patch.dict(sys.modules, {'re2': None})
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_regex_selector_names_what_to_install(self):
        exc = self.assertRaises(ValueError, multicast_rules.Selector.parse,
                                'payload.name regex ^prod-')
        self.assertIn('google-re2 package', str(exc))
        self.assertIn('oslo.messaging-ext[regex]', str(exc))
        # The other operators need nothing.
        multicast_rules.Selector.parse('payload.name prefix prod-')

    def test_load_error_and_the_standard_notifications_flow(self):
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = named, other
            [multicast_rule_named]
            selector = payload.name regex ^prod-
            targets = named
            [multicast_rule_other]
            selector = *
            targets = other
            """)
        self.assertIn('[multicast_rule_named] selector = payload.name regex '
                      '^prod-', str(driver.config_error))
        self.assertIn('oslo.messaging-ext[regex]', str(driver.config_error))
        driver.notify({}, test_multicast.envelope(), 'INFO', -1)
        self.assertEqual(['notifications.info'], self.topics())


class LoadErrorTestCase(test_multicast.DriverFixtureMixin,
                        base.BaseTestCase):

    def test_overflowing_repetition_is_a_load_error(self):
        # Python's re raises OverflowError on it; RE2 would read it as
        # literal text.
        driver = self.driver("""
            [oslo_messaging_multicast]
            rules = huge
            [multicast_rule_huge]
            selector = payload.name regex a{99999999999}
            targets = huge
            """)
        self.assertIn('[multicast_rule_huge] selector = payload.name regex '
                      'a{99999999999}', str(driver.config_error))
        self.assertIn('RE2 repeats at most 1000 times, not 99999999999',
                      str(driver.config_error))
        driver.notify({}, test_multicast.envelope(), 'INFO', -1)
        self.assertEqual(['notifications.info'], self.topics())


class Unencodable:
    """What the standard send cannot encode either."""


class WireViewTestCase(base.BaseTestCase):
    """Selectors read what consumers of the standard topic read."""

    def matches(self, text, payload=None, ctxt=None):
        return multicast_rules.Selector.parse(text).matches(
            {'event_type': 'image.upload', 'payload': payload}, ctxt)

    def test_payload_objects_read_as_the_wire_encodes_them(self):
        image_id = uuid.UUID('6c1d3a0e-4c2b-4a57-9d36-6d4e5d0f8a11')
        payload = {'created_at': datetime.datetime(2026, 3, 1, 12, 30, 5),
                   'id': image_id, 'tags': ('gold', 'lts'),
                   'size': 1036, 'protected': False}
        self.assertTrue(self.matches('payload.created_at prefix 2026-',
                                     payload))
        self.assertTrue(self.matches(
            'payload.created_at exact 2026-03-01T12:30:05.000000', payload))
        self.assertTrue(self.matches('payload.id exact %s' % image_id,
                                     payload))
        self.assertTrue(self.matches('payload.tags contains lts', payload))
        self.assertTrue(self.matches('payload.tags.1 exact lts', payload))
        self.assertTrue(self.matches('payload.size exact 1036', payload))
        self.assertTrue(self.matches('payload.protected exact false',
                                     payload))

    def test_context_read_as_its_to_dict(self):
        ctxt = context.RequestContext(user_id='u1', project_id='p1',
                                      user_name='alice')
        self.assertIn('user_identity', ctxt.to_dict())
        self.assertTrue(self.matches('context.user_identity prefix u1 p1',
                                     ctxt=ctxt))
        self.assertTrue(self.matches('context.project_id exact p1',
                                     ctxt=ctxt))
        # An attribute that to_dict() leaves out is not on the wire.
        self.assertNotIn('user_name', ctxt.to_dict())
        self.assertFalse(self.matches('context.user_name exact alice',
                                      ctxt=ctxt))
        self.assertTrue(self.matches('context.user_name !exact alice',
                                     ctxt=ctxt))

    def test_converted_once_per_notification_and_only_if_read(self):
        dumps = self.useFixture(fixtures.MockPatch(
            'oslo_serialization.jsonutils.dumps',
            side_effect=multicast_rules.jsonutils.dumps)).mock
        notification = multicast_rules.Notification(
            {'event_type': 'x', 'payload': {'a': 1}}, {'user': 'u'})
        event_type = multicast_rules.Selector.parse('event_type exact x')
        self.assertTrue(event_type.evaluate(notification))
        self.assertEqual(0, dumps.call_count)
        for text in ('payload.a exact 1', 'payload.a !exact 2',
                     'context.user exact u'):
            self.assertTrue(multicast_rules.Selector.parse(
                text).evaluate(notification))
        self.assertEqual(2, dumps.call_count)

    def test_non_ascii_digit_in_a_path_is_a_key(self):
        # '²'.isdigit() is true and int() refuses it.
        payload = {'locations': ['a', 'b', 'c'], 'l': {'²': 'x'}}
        self.assertFalse(self.matches('payload.locations.² exact c',
                                      payload))
        self.assertTrue(self.matches('payload.l.² exact x', payload))
        self.assertTrue(self.matches('payload.locations.2 exact c',
                                     payload))

    def test_failure_at_match_time_is_logged_rate_limited(self):
        logger = self.useFixture(test_utils.FakeLogger(
            multicast_rules.__name__))
        self.useFixture(fixtures.MockPatchObject(
            multicast_rules, '_LAST_LOGGED', {}))
        clock = [100.0]
        self.useFixture(fixtures.MockPatch(
            'time.monotonic', side_effect=lambda: clock[0]))
        selector = multicast_rules.Selector.parse('payload.x exact y')
        for _ in range(3):
            self.assertFalse(selector.matches(
                {'event_type': 'e', 'payload': {'x': Unencodable()}}))
        self.assertEqual(1, logger.output.count('cannot be encoded'))
        clock[0] += multicast_rules.ERROR_INTERVAL
        selector.matches({'event_type': 'e', 'payload': Unencodable()})
        self.assertEqual(2, logger.output.count('cannot be encoded'))
        # A context without to_dict() cannot be sent either.
        self.assertFalse(multicast_rules.Selector.parse(
            'context.user !exact u').matches({}, Unencodable()))
        self.assertIn("the notification's context cannot be encoded",
                      logger.output)

    def test_selector_raising_never_raises_into_the_service(self):
        logger = self.useFixture(test_utils.FakeLogger(
            multicast_rules.__name__))
        self.useFixture(fixtures.MockPatchObject(
            multicast_rules, '_LAST_LOGGED', {}))
        selector = multicast_rules.Selector.parse('payload.x exact y')
        self.useFixture(fixtures.MockPatchObject(
            selector, '_test', side_effect=RuntimeError('boom')))
        self.assertFalse(selector.matches({'event_type': 'e',
                                           'payload': {'x': 'y'}}))
        self.assertIn('selector "payload.x exact y" failed on a e '
                      'notification and does not match: boom', logger.output)


class MatchAllTestCase(base.BaseTestCase):

    def test_star_matches_every_notification(self):
        selector = multicast_rules.Selector.parse(' * ')
        self.assertTrue(selector.matches({}, {}))
        self.assertTrue(selector.matches({'event_type': 'x'}, None))
        self.assertIsNone(selector.indexable_event_types)

    def test_star_is_not_a_field(self):
        self.assertRaises(ValueError, multicast_rules.Selector.parse,
                          '* exact x')


class ImportTestCase(base.BaseTestCase):

    @test_unix_subscriber.skip_inside_oslo_messaging
    def test_importable_without_oslo_messaging(self):
        # oslo-notify-tail reuses the selectors and must stay light.
        code = ('import sys\n'
                'from oslo_messaging_ext.notify import _multicast_rules as r\n'
                'r.Selector.parse("payload.disk_format exact qcow2")\n'
                'print(sorted(m for m in sys.modules\n'
                '             if m.startswith("oslo_messaging.")\n'
                '             or m == "oslo_messaging"))\n')
        out = subprocess.run([sys.executable, '-c', code], check=True,
                             capture_output=True, text=True).stdout
        self.assertEqual('[]\n', out)
