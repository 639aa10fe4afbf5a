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

"""Regex selectors on adversarial values: the attack corpus, timed.

Every accepted pattern of the unit tests' attack corpus is run, as a
selector, on values of MAX_REGEX_INPUT characters built to make engines
work hardest: repeated units that almost match, random strings over the
pattern's letters, multi-byte characters. Each figure is the slowest value
for that pattern; for each value the fastest of a few searches, each by a
freshly compiled RE2 (its automaton built from nothing, as after a cache
reset), so that a scheduling pause does not count as matching time.
Refused patterns are listed with their reason.
"""

import random
import time

from benchmarks import _harness
from oslo_messaging_ext.notify import _multicast_rules
from oslo_messaging_ext.tests.unit import test_multicast_rules

BOUND_MS = 1.0
UNITS = ['a', 'ab', 'a-', 'x', 'aab', 'a ', '0', 'é', '😀', 'a😀']
ENDINGS = ['!', 'a', 'b', 'x']
ALPHABETS = ['ab', 'abc', 'aé😀']


def adversarial_values(quick):
    size = _multicast_rules.MAX_REGEX_INPUT
    values = [(unit * size)[:size - 1] + end
              for unit in UNITS for end in ENDINGS]
    rand = random.Random(22)
    for alphabet in ALPHABETS:
        for _ in range(1 if quick else 4):
            values.append(''.join(rand.choice(alphabet)
                                  for _ in range(size)))
    assert all(len(v) == size for v in values)
    return values


def _cold_search_seconds(re2, text, message, repeats):
    best = None
    for _ in range(repeats):
        re2.purge()  # the next compile builds a new RE2 object
        selector = _multicast_rules.Selector.parse(text)
        start = time.perf_counter()
        selector.matches(message)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best


def table(quick):
    try:
        import re2
    except ImportError:
        return _harness.Table('regex selectors: skipped, google-re2 (the '
                              'regex extra) is not installed')
    values = adversarial_values(quick)
    accepted = [p for p, reason in test_multicast_rules.ATTACK
                if reason is None]
    title = ('regex selectors: attack corpus of %d patterns, %d accepted, '
             'on %d values of %d characters'
             % (len(test_multicast_rules.ATTACK), len(accepted), len(values),
                _multicast_rules.MAX_REGEX_INPUT))
    result = _harness.Table(title)
    for pattern in accepted:
        text = 'payload.name regex ' + pattern
        worst = max(_cold_search_seconds(re2, text,
                                         {'payload': {'name': value}},
                                         3)
                    for value in values)
        result.add(pattern, worst * 1e3, 'ms',
                   target='<= %g ms' % BOUND_MS, ok=worst * 1e3 <= BOUND_MS)
    for pattern, reason in test_multicast_rules.ATTACK:
        if reason is not None:
            try:
                _multicast_rules.Selector.parse('payload.name regex %s'
                                                % pattern)
                refused = False
            except ValueError:
                refused = True
            result.add('%s (refused: %s)' % (pattern, reason), 0.0,
                       'ms', target='refused', ok=refused)
    return result
