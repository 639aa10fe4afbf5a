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

Selectors read the notification as the standard topic carries it, not as
the service built it (see Notification): what a consumer sees is what a
selector matches, and oslo-messaging-ext-check predicts the same.

Selectors run in the service's thread on tenant input (image names,
properties): none may take more than a few milliseconds, whatever the
value. A regex selector therefore runs on RE2 (the optional google-re2
package), whose matching time is linear in the value, never on Python's
backtracking engine; it only ever sees values of at most MAX_REGEX_INPUT
characters and programs of at most MAX_REGEX_PROGRAM instructions. A
selector that fails on a notification is logged, rate-limited, and does
not match: it never raises into the service.

This module must not import oslo_messaging: the subscriber side
(oslo-notify-tail) reuses the selector language without it.
"""

import fnmatch
import logging
import re
import time

from oslo_serialization import jsonutils

LOG = logging.getLogger(__name__)

FIELDS = ('event_type', 'priority', 'publisher_id', 'message_id')
FIELD_PREFIXES = ('payload.', 'context.')
OPERATORS = ('exact', 'glob', 'regex', 'prefix', 'contains', 'in')
MATCH_ALL = '*'

# Longest value a regex selector is evaluated on; a longer one does not
# match (so its negation does). Image names, ids and event types are far
# shorter; the bound is what makes the cost of a search finite.
MAX_REGEX_INPUT = 1024

# Largest RE2 program a regex may compile to, and the memory each may use.
# RE2 matches in time proportional to the value's length times the
# program's size; small programs whose automaton would need many states
# (``(a|b)*a(a|b){20}``) fill the small memory budget at once and RE2 falls
# back to its NFA, which is faster for them. Together they keep a search
# of a MAX_REGEX_INPUT value within about a millisecond (ATTACK in the
# unit tests, timed on adversarial values), and 1,000 regexes within
# 64 MiB.
# Operators' patterns compile to a few dozen instructions (a UUID, 70);
# ``[\s\S]{20}x``, 145, searched anywhere in a value of 1024 emoji took
# 1.1 to 1.8 ms on a loaded machine.
MAX_REGEX_PROGRAM = 128
REGEX_MAX_MEM = 64 * 1024

# RE2 repeats at most this many times (nested counts multiplied).
_MAX_REPEAT = 1000

REGEX_PACKAGE = 'google-re2'
REGEX_EXTRA = 'oslo.messaging-ext[regex]'

# Match-time failures are logged at most this often per selector.
ERROR_INTERVAL = 60.0

_MISSING = object()
_UNREADABLE = object()


class Notification:
    """A notification as consumers of the standard topic read it.

    The driver is handed what the service built, after the notifier's
    serializer: a RequestContext, datetimes, UUIDs. oslo.messaging's AMQP
    drivers send the context's ``to_dict()`` (a dict as it is) and encode
    the message with ``jsonutils.dumps``, so a consumer reads ISO strings,
    plain strings and lists. Selectors read those: each part is converted
    on first use, once per notification, and only if a selector reads it.
    """

    __slots__ = ('message', '_context', '_payload', '_wire_context')

    def __init__(self, message, context):
        self.message = message
        self._context = context
        self._payload = self._wire_context = _MISSING

    @property
    def payload(self):
        if self._payload is _MISSING:
            self._payload = _wire(self.message.get('payload'), 'payload')
        return self._payload

    @property
    def context(self):
        if self._wire_context is _MISSING:
            self._wire_context = _wire(self._context, 'context')
        return self._wire_context


def _wire(value, what):
    """``value`` encoded and decoded as the AMQP drivers do, or None."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    try:
        if what == 'context' and not isinstance(value, dict):
            value = value.to_dict()
        return jsonutils.loads(jsonutils.dumps(value))
    except Exception as exc:
        # The standard send encodes the same value, and fails the same.
        _log_rate_limited(('wire', what), 'messaging-multicast: the '
                          'notification\'s %s cannot be encoded as the '
                          'standard topic encodes it (%s): no selector on '
                          'it matches, negated or not', what, exc)
        return _UNREADABLE


_LAST_LOGGED = {}


def _log_rate_limited(key, msg, *args):
    now = time.monotonic()
    last = _LAST_LOGGED.get(key)
    if last is not None and now - last < ERROR_INTERVAL:
        return
    _LAST_LOGGED[key] = now
    LOG.error(msg, *args)


def _text(value):
    """The text a selector compares, or None when it cannot match."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _path(dotted):
    """(key, list index or None) pairs of a dotted path.

    Only ASCII digits index a list: ``'²'.isdigit()`` is true, yet int()
    refuses it.
    """
    return tuple((key, int(key) if key.isascii() and key.isdigit()
                  else None) for key in dotted.split('.'))


def _lookup(container, path):
    """The value at ``path`` in decoded JSON (dicts, lists), or None."""
    for key, index in path:
        if isinstance(container, dict):
            container = container.get(key)
        elif isinstance(container, list) and index is not None:
            container = container[index] if index < len(container) else None
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
            self._source = 'payload'
            self._path = _path(field[len('payload.'):])
        elif field.startswith('context.'):
            self._source = 'context'
            self._path = _path(field[len('context.'):])
        else:
            self._source, self._path = 'message', ((field, None),)
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
            search = compile_regex(value, ignore_case=self._fold)
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

    def matches(self, message, ctxt=None):
        """Whether the selector matches ``message`` sent with ``ctxt``."""
        return self.evaluate(Notification(message, ctxt))

    def evaluate(self, notification):
        """Whether the selector matches a Notification; never raises."""
        if self.operator == 'all':
            return True
        try:
            found = self._evaluate(notification)
            if found is not None:
                return found != self.negated
        except Exception as exc:
            _log_rate_limited(
                ('selector', id(self)), 'messaging-multicast: selector '
                '"%s %s%s %s" failed on a %s notification and does not '
                'match: %s', self.field, '!' if self.negated else '',
                self.operator, self.value,
                notification.message.get('event_type'), exc)
        return False

    def _evaluate(self, notification):
        """Whether the field matches; None if the source is unreadable."""
        if self._source == 'message':
            raw = notification.message.get(self.field)
        else:
            source = (notification.payload if self._source == 'payload'
                      else notification.context)
            if source is _UNREADABLE:
                return None
            raw = _lookup(source, self._path)
        if self.operator == 'contains' and isinstance(raw, list):
            return any(_text(item) == self._needle for item in raw)
        text = _text(raw)
        if text is None:
            return False
        return bool(self._test(text.lower() if self._fold else text))


# Why RE2 refuses a construct of Python's re, and what to write instead.
_UNSUPPORTED = [
    (re.compile(r'\(\?<?[=!]'),
     'it holds a lookaround ((?=...), (?!...), (?<=...) or (?<!...)), which '
     'RE2 does not have: it matches in linear time. Select the positive '
     'form with a negated selector instead, e.g. "payload.name !prefix '
     'test-" or "payload.name !regex ^test-" for ^(?!test-)'),
    (re.compile(r'\(\?P=|\\[1-9]|\\g<'),
     'it holds a backreference (\\1, (?P=name)), which RE2 does not have: '
     'it matches in linear time. Spell the repeated text out, or use '
     'several selectors'),
    (re.compile(r'\(\?>|[*+?}]\+'),
     'it holds an atomic group or a possessive repetition ((?>...), a++), '
     'which RE2 does not have and does not need: it never backtracks. '
     'Write the group or the repetition plainly'),
    (re.compile(r'\\Z'),
     'RE2 has no \\Z: write \\z, or $'),
]

# A counted repetition {n}, {n,}, {n,m} or {,m} not escaped by a backslash.
_REPEAT = re.compile(r'(?<!\\)(?:\\\\)*\{(\d*)(?:,(\d*))?\}')


def compile_regex(pattern, ignore_case=False):
    """The search function of ``pattern`` on RE2; ValueError if refused.

    Refused, with the reason: what RE2 refuses (lookarounds and
    backreferences among them), a counted repetition that RE2 would read as
    literal text (above 1000 times, or ``{,m}``), and a pattern compiling
    to more than MAX_REGEX_PROGRAM instructions.
    """
    re2 = _re2_module()
    options = re2.Options()
    options.never_capture = True
    options.log_errors = False
    options.max_mem = REGEX_MAX_MEM
    options.case_sensitive = not ignore_case
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        for construct, why in _UNSUPPORTED:
            if construct.search(pattern):
                raise ValueError(f'regex {pattern!r} is refused: {why}')
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode('utf-8', 'replace')
        if 'pattern too large' in str(reason):
            raise ValueError(_too_large(pattern))
        if 'repetition size' in str(reason):
            reason = (f'{reason} (RE2 repeats at most {_MAX_REPEAT} times, '
                      f'nested counts multiplied)')
        raise ValueError(f'invalid regex {pattern!r} (RE2 syntax): {reason}')
    for match in _REPEAT.finditer(pattern):
        low, high = match.group(1), match.group(2)
        if not low and not high:
            continue
        if not low:
            raise ValueError(
                f'regex {pattern!r} is refused: RE2 reads {{,{high}}} as '
                f'literal text: write {{0,{high}}} for a repetition, or '
                f'\\{{ for a brace')
        largest = max(int(n) for n in (low, high) if n)
        if largest > _MAX_REPEAT:
            raise ValueError(
                f'regex {pattern!r} is refused: RE2 repeats at most '
                f'{_MAX_REPEAT} times, not {largest} (write \\{{ for a '
                f'brace)')
    if compiled.programsize > MAX_REGEX_PROGRAM:
        raise ValueError(_too_large(pattern, compiled.programsize))
    return compiled.search


def _too_large(pattern, size=None):
    size = f'{size} RE2 instructions,' if size else 'RE2 instructions'
    return (f'regex {pattern!r} is refused: it compiles to {size} more than '
            f'the {MAX_REGEX_PROGRAM} allowed, and matching time grows with '
            f'that size: use smaller counted repetitions ({{n,m}}), or a '
            f'glob, prefix or in selector')


def _re2_module():
    """The re2 module of google-re2; ValueError naming it when missing."""
    try:
        import re2
    except ImportError:
        raise ValueError(
            f'regex selectors need the {REGEX_PACKAGE} package (RE2, which '
            f'matches in linear time), which is not installed: install '
            f'{REGEX_EXTRA}, or use an exact, glob, prefix, contains or in '
            f'selector')
    return re2


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

    def matches(self, notification):
        """Whether every selector matches a Notification."""
        for selector in self.selectors:
            if not selector.evaluate(notification):
                return False
        return True
