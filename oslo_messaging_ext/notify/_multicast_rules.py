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

"""The rules of the ``messaging-multicast`` driver and their selectors.

A selector is one ``FIELD [OPERATOR] VALUE`` condition on a notification,
or ``*`` (every notification); a rule fires its destinations when all its
selectors match.

Selectors run in the service's thread on tenant input (image names,
properties): none may take more than a few milliseconds, whatever the
value. Python's backtracking regular expressions can take hours on a few
dozen characters, so a regex selector is checked at parse time against a
cost model of the backtracking (see _RegexCost) and only ever sees values
of at most MAX_REGEX_INPUT characters.

This module must not import oslo_messaging: the subscriber side
(oslo-notify-tail) reuses the selector language without it.
"""

import fnmatch
import re

try:
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_constants
    import sre_parse

FIELDS = ('event_type', 'priority', 'publisher_id', 'message_id')
FIELD_PREFIXES = ('payload.', 'context.')
OPERATORS = ('exact', 'glob', 'regex', 'prefix', 'contains', 'in')
MATCH_ALL = '*'

# Longest value a regex selector is evaluated on; a longer one does not
# match (so its negation does). Image names, ids and event types are far
# shorter; the bound is what makes the cost of a search finite.
MAX_REGEX_INPUT = 1024

# The most backtracking paths (see _RegexCost) a regex may have on a value
# of MAX_REGEX_INPUT characters: a few milliseconds of the sre engine.
MAX_REGEX_COST = 2 ** 22


def _text(value):
    """The text a selector compares, or None when it cannot match."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _lookup(container, path):
    """The value at ``path`` in nested dicts, lists and objects, or None."""
    for key in path:
        if isinstance(container, dict):
            container = container.get(key)
        elif isinstance(container, (list, tuple)) and key.isdigit():
            index = int(key)
            container = container[index] if index < len(container) else None
        elif container is not None and not isinstance(container, str):
            # A RequestContext, or anything exposing attributes.
            container = getattr(container, key, None)
        else:
            return None
        if container is None:
            return None
    return container


class Selector:
    """A compiled ``FIELD [OPERATOR] VALUE`` condition."""

    def __init__(self, field, operator, negated, value):
        self.field = field
        self.operator = operator
        self.negated = negated
        self.value = value
        if field.startswith('payload.'):
            self._source, path = 'payload', field[len('payload.'):]
            self._path = tuple(path.split('.'))
        elif field.startswith('context.'):
            self._source, path = 'context', field[len('context.'):]
            self._path = tuple(path.split('.'))
        else:
            self._source, self._path = 'message', (field,)
        # Priorities arrive upper case ('INFO') while every consumer-facing
        # name is lower case ('notifications.info'): compare in lower case.
        self._fold = field == 'priority'
        if self._fold and operator != 'regex':
            value = value.lower()
        if operator == 'in':
            self.members = frozenset(v.strip() for v in value.split(',')
                                     if v.strip())
            self._test = self.members.__contains__
        elif operator == 'exact':
            self._test = value.__eq__
        elif operator == 'prefix':
            self._test = lambda text: text.startswith(value)
        elif operator == 'contains':
            self._test = lambda text: value in text
        elif operator == 'glob':
            self._test = re.compile(fnmatch.translate(value)).match
        elif operator == 'all':
            self._test = lambda text: True
        else:
            search = re.compile(
                value, re.IGNORECASE if self._fold else 0).search
            self._test = lambda text: (len(text) <= MAX_REGEX_INPUT and
                                       search(text))
        self._needle = value

    @classmethod
    def parse(cls, text):
        """Return a Selector for ``text``; raise ValueError if invalid."""
        if text.strip() == MATCH_ALL:
            return cls(MATCH_ALL, 'all', False, MATCH_ALL)
        parts = text.strip().split(None, 2)
        if len(parts) < 2:
            raise ValueError('expected "FIELD [OPERATOR] VALUE"')
        field = parts[0]
        if len(parts) == 2:
            operator, value = 'exact', parts[1]
        else:
            operator, value = parts[1], parts[2]
        if not (field in FIELDS or any(
                field.startswith(p) and len(field) > len(p) and
                all(field[len(p):].split('.')) for p in FIELD_PREFIXES)):
            raise ValueError('unknown field %r; use one of %s, '
                             'payload.<dotted.path> or context.<key>'
                             % (field, ', '.join(FIELDS)))
        negated = operator.startswith('!')
        if operator.lstrip('!') not in OPERATORS or operator.count('!') > 1:
            raise ValueError('unknown operator %r; use one of %s, each '
                             'optionally negated by a leading "!"'
                             % (operator, ', '.join(OPERATORS)))
        operator = operator.lstrip('!')
        if operator == 'regex':
            check_regex(value)
        if operator == 'in' and not any(v.strip() for v in value.split(',')):
            raise ValueError('"in" needs at least one value')
        return cls(field, operator, negated, value)

    @property
    def indexable_event_types(self):
        """Event types this selector restricts matches to, or None."""
        if self.field != 'event_type' or self.negated:
            return None
        if self.operator == 'exact':
            return frozenset([self.value])
        if self.operator == 'in':
            return self.members
        return None

    def matches(self, message, ctxt):
        if self.operator == 'all':
            return True
        if self._source == 'message':
            raw = message.get(self._path[0])
        elif self._source == 'payload':
            raw = _lookup(message.get('payload'), self._path)
        else:
            raw = _lookup(ctxt, self._path)
        if self.operator == 'contains' and isinstance(raw, (list, tuple)):
            found = any(_text(item) == self._needle for item in raw)
        else:
            text = _text(raw)
            if text is None:
                found = False
            else:
                found = bool(self._test(text.lower() if self._fold
                                        else text))
        return found != self.negated


def check_regex(pattern):
    """Raise ValueError unless ``pattern`` is a regex a selector may use.

    Refused: what does not compile, backreferences, lookarounds and
    conditionals (their cost cannot be bounded), a repetition of anything
    holding a repetition or an alternation (``(a+)+``, ``(a|aa)+``,
    ``(.*a){20}``: exponential or high-degree polynomial), and patterns
    whose backtracking paths on a value of MAX_REGEX_INPUT characters
    exceed MAX_REGEX_COST (``.*a.*b`` searched anywhere in the value).
    """
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise ValueError(f'invalid regex {pattern!r}: {exc}')
    cost = _RegexCost(pattern)
    paths = cost.of(parsed)
    if not _anchored(parsed):
        # re.search tries every start position.
        paths *= MAX_REGEX_INPUT
    if paths > MAX_REGEX_COST:
        raise ValueError(
            f'regex {pattern!r} could backtrack too long on a '
            f'{MAX_REGEX_INPUT}-character value: use at most one unbounded '
            f'repetition (*, +, {{n,}}), or two when the pattern starts '
            f'with ^, or a glob, prefix or in selector instead')
    return pattern


def _anchored(parsed):
    """Whether a search of ``parsed`` only tries the value's start."""
    if parsed.state.flags & re.MULTILINE or not len(parsed):
        return False
    op, arg = parsed[0]
    starts = (sre_constants.AT_BEGINNING, sre_constants.AT_BEGINNING_STRING)
    return op is sre_constants.AT and arg in starts


class _RegexCost:
    """An upper bound of the backtracking paths of a parsed regex.

    A sequence costs the product of its items; an alternation the sum of
    its branches; a variable repetition of a single character (or class)
    of something without choices one path per count it can take on a value
    of MAX_REGEX_INPUT characters (16 unless it repeats a single character
    or class; a possessive one, a single path).
    Constructs with no such bound raise ValueError.
    """

    _SIMPLE = {sre_constants.LITERAL, sre_constants.NOT_LITERAL,
               sre_constants.IN, sre_constants.ANY, sre_constants.AT,
               sre_constants.CATEGORY}
    _REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT,
                getattr(sre_constants, 'POSSESSIVE_REPEAT', None)} - {None}

    def __init__(self, pattern):
        self.pattern = pattern

    def _refuse(self, what):
        raise ValueError(f'regex {self.pattern!r} is refused: {what} has '
                         f'no bounded matching time on tenant input')

    def of(self, items):
        total = 1
        for op, arg in items:
            total *= self._item(op, arg)
        return total

    def _item(self, op, arg):
        if op in self._SIMPLE:
            return 1
        if op is sre_constants.SUBPATTERN:
            return self.of(arg[-1])
        if op is getattr(sre_constants, 'ATOMIC_GROUP', None):
            return self.of(arg)
        if op is sre_constants.BRANCH:
            return sum(self.of(branch) for branch in arg[1])
        if op in self._REPEATS:
            low, high, item = arg
            inner = self.of(item)
            if high == low:
                return inner ** low
            if inner > 1:
                self._refuse('a repetition of a group holding a repetition '
                             'or an alternation')
            if op is getattr(sre_constants, 'POSSESSIVE_REPEAT', None):
                return 1
            counts = min(high, MAX_REGEX_INPUT) - min(low, MAX_REGEX_INPUT)
            if not (len(item) == 1 and item[0][0] in self._SIMPLE):
                # sre repeats anything but one character class with its
                # general loop, an order of magnitude slower per step.
                counts *= 16
            return counts + 1
        if op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
            self._refuse('a backreference or conditional')
        if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            self._refuse('a lookahead or lookbehind')
        self._refuse(f'{op}')


class Rule:
    """Selectors and the destinations they fire."""

    def __init__(self, name, ordinal, selectors, destinations,
                 event_key=None):
        self.name = name
        self.ordinal = ordinal
        self.selectors = selectors
        self.destinations = destinations
        # onmcast replicas carry the matched key as their event_type.
        self.event_key = event_key

    def matches(self, message, ctxt):
        for selector in self.selectors:
            if not selector.matches(message, ctxt):
                return False
        return True
