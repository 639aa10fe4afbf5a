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

A selector is one ``FIELD [OPERATOR] VALUE`` condition on a notification;
a rule fires its destinations when all its selectors match.
"""

import fnmatch
import re

FIELDS = ('event_type', 'priority', 'publisher_id', 'message_id')
FIELD_PREFIXES = ('payload.', 'context.')
OPERATORS = ('exact', 'glob', 'regex', 'prefix', 'contains', 'in')


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
        else:
            self._test = re.compile(
                value, re.IGNORECASE if self._fold else 0).search
        self._needle = value

    @classmethod
    def parse(cls, text):
        """Return a Selector for ``text``; raise ValueError if invalid."""
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
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f'invalid regex {value!r}: {exc}')
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
