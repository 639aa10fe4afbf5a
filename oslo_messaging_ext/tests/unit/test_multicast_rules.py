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

"""Selectors: the match-all selector and the bounded cost of regexes."""

import subprocess
import sys
import time

from oslotest import base

from oslo_messaging_ext.notify import _multicast_rules as multicast_rules
from oslo_messaging_ext.tests.unit import test_unix_subscriber

# The classic catastrophic patterns: exponential or high-degree polynomial
# backtracking on a string that almost matches.
CATASTROPHIC = [
    '(a+)+$', '(a|aa)+$', '(.*a){20}', '(a*)*b', '((ab)*)+c', '(x+x+)+y',
    r'(\w+\s?)+$', '^(a|a?)+$', '(a|a)*$', '^(([a-z])+.)+[A-Z]([a-z])+$',
    '.*a.*b', 'a*a*a*b', r'(\d+)*x', '(?:a|b|ab)*c',
    # Unbounded by construction.
    r'(a)\1', r'(?P<x>a)(?P=x)', '(?=a)a', '(?!b)a', '(?<=a)b', '(?<!a)b',
]

# Accepted, yet each as close to the cost bound as the rules allow.
WORST_ACCEPTED = [
    '.*b', 'a*b', '^.*a.*b$', '^[a-z]+-[0-9]+$', '(x|a).*b', '^(ab)+c',
    '^(a|b)+c', '(?:aa|a)(?:aa|a)(?:aa|a)(?:aa|a)(?:aa|a)b', 'a?a?a?a?aaaa',
    r'^[0-9]{4,}$', 'a{1000}b',
]

# Almost matching values, repeated: what makes backtracking explode.
UNITS = ['a', 'ab', 'a-', 'abc', 'x', '-']

# Far above what the selectors may cost (a few milliseconds), far below
# what a catastrophic pattern takes (seconds to hours): a bound that could
# only fail if a selector went back to running unbounded.
SAFETY_BOUND = 0.25


def adversarial_values():
    for size in (26, 40, 1000, multicast_rules.MAX_REGEX_INPUT,
                 64 * 1024):
        for unit in UNITS:
            text = (unit * size)[:size - 1]
            yield text + '!'
            yield text + 'a'


class RegexCostTestCase(base.BaseTestCase):

    def test_catastrophic_patterns_refused_at_parse(self):
        for pattern in CATASTROPHIC:
            exc = self.assertRaises(
                ValueError, multicast_rules.Selector.parse,
                'payload.name regex %s' % pattern)
            self.assertIn(repr(pattern), str(exc))

    def test_refusal_says_why(self):
        exc = self.assertRaises(ValueError, multicast_rules.check_regex,
                                '(a+)+$')
        self.assertIn('a repetition of a group holding a repetition', str(exc))
        exc = self.assertRaises(ValueError, multicast_rules.check_regex,
                                '(a)\\1')
        self.assertIn('backreference', str(exc))
        exc = self.assertRaises(ValueError, multicast_rules.check_regex,
                                '.*a.*b')
        self.assertIn('could backtrack too long', str(exc))
        self.assertIn('starts with ^', str(exc))

    def test_no_selector_slow_on_any_value_up_to_64k(self):
        selectors = ['payload.name regex %s' % p for p in WORST_ACCEPTED]
        selectors += ['payload.name glob *a*a*a*a*a*b',
                      'payload.name glob *[a-z]*?*b',
                      'payload.name contains aaaaaaaaab',
                      'payload.name prefix aaab',
                      'payload.name in a,b,c']
        worst = (0.0, None)
        for text in selectors:
            selector = multicast_rules.Selector.parse(text)
            for value in adversarial_values():
                message = {'payload': {'name': value}}
                start = time.perf_counter()
                selector.matches(message, {})
                elapsed = time.perf_counter() - start
                worst = max(worst, (elapsed, (text, value[:8], len(value))))
        self.assertLess(worst[0], SAFETY_BOUND, worst)

    def test_longer_values_never_match_a_regex(self):
        limit = multicast_rules.MAX_REGEX_INPUT
        selector = multicast_rules.Selector.parse('payload.name regex ^a')
        negated = multicast_rules.Selector.parse('payload.name !regex ^a')
        for size, expected in ((limit, True), (limit + 1, False)):
            message = {'payload': {'name': 'a' * size}}
            self.assertIs(expected, selector.matches(message, {}))
            self.assertIs(not expected, negated.matches(message, {}))

    def test_useful_patterns_accepted(self):
        for pattern in [r'^image\.(upload|delete)$', '^prod-', r'\.qcow2$',
                        '^[a-z0-9-]+$', '(?i)^CirrOS', 'ubuntu-2[24]\\.04',
                        '^(?:[a-f0-9]{8}-(?:[a-f0-9]{4}-){3}[a-f0-9]{12})$']:
            multicast_rules.check_regex(pattern)


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
