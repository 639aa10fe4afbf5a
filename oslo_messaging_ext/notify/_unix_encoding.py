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

"""What the unix notification driver writes on a line (private).

The envelope is masked as oslo.messaging's log driver masks it
(``strutils.mask_dict_password``), the optional context is stripped of
tokens and secrets, and every line is stamped with the sequence number of
its emitting process (see :class:`Sequence`), then encoded as one JSON
line.

Masking with ``mask_dict_password`` costs about ten times the rest of the
driver on a glance payload: it lowercases every string once per secret
key. :func:`mask_envelope` gives the same result faster (it calls
``strutils`` only for a string that may hold a secret), and
:func:`make_line_encoder` avoids even that when the encoded line shows
that nothing can match.
"""

import collections
import collections.abc
import datetime
import functools
import itertools
import json
import math
import os
import sys
import threading

from oslo_serialization import jsonutils
from oslo_utils import strutils
try:
    import orjson
except ImportError:  # the stdlib encoder is as correct, only slower
    orjson = None

# What strutils writes in place of a secret (a mask, not a password).
SECRET = '***'  # nosec B105

# Context keys never sent, whatever their value; any key that mentions a
# token or a secret is removed too, and password-like ones are masked.
_SECRET_CONTEXT_KEYS = frozenset(['auth_token', 'auth_token_info',
                                  'service_token', 'service_auth_token',
                                  'password', 'secret', 'credentials'])
_SECRET_KEY_WORDS = ('token', 'secret', 'password', 'credential')


def _secret_words():
    """The words strutils masks on, all lowercase; None if unknown.

    strutils keeps them in a private list. Should it disappear or change
    shape, masking goes through strutils for everything: slower, as exact.
    """
    words = getattr(strutils, '_SANITIZE_KEYS', None)
    if (not isinstance(words, (list, tuple)) or not words or
            not all(isinstance(w, str) and w and w == w.lower() and
                    w.isascii() for w in words)):
        return None
    return tuple(words)


def _anchors(words):
    """A few substrings such that every word holds at least one.

    Testing a handful of substrings is much cheaper than testing every
    word; only a string holding an anchor is checked in full. Of equally
    useful ones the longer is taken: a search skips ahead by the length
    of what it looks for.
    """
    uncovered = set(words)
    anchors = []
    while uncovered:
        counts = collections.Counter(
            w[i:j] for w in uncovered for i in range(len(w))
            for j in range(i + 3, len(w) + 1))
        if not counts:
            anchors.extend(sorted(uncovered))
            break
        anchor = max(sorted(counts), key=lambda a: (counts[a], len(a)))
        anchors.append(anchor)
        uncovered = {w for w in uncovered if anchor not in w}
    return tuple(anchors)


_WORDS = _secret_words()
_ANCHORS = _anchors(_WORDS) if _WORDS else ()


def _may_hold_secret_word(lowered):
    """Whether ``lowered`` contains a word strutils masks on.

    The anchors rule most strings out at once; the words are tested only
    on a string that holds one.
    """
    for anchor in _ANCHORS:
        if anchor in lowered:
            break
    else:
        return False
    for word in _WORDS:
        if word in lowered:
            return True
    return False


# Keys and many values recur from one notification to the next: whether
# one holds a secret word is remembered (bounded: they may be data too).
_verdicts = {}
_MAX_VERDICTS = 4096
_MAX_REMEMBERED_LENGTH = 256


def _holds_secret_word(text):
    """``any(word in text.lower() for word in _WORDS)``, for a str."""
    verdict = _verdicts.get(text)
    if verdict is None:
        verdict = _may_hold_secret_word(text.lower())
        if len(text) <= _MAX_REMEMBERED_LENGTH:
            if len(_verdicts) >= _MAX_VERDICTS:
                _verdicts.clear()
            _verdicts[text] = verdict
    return verdict


def _mask_string(value):
    if type(value) is str and not _holds_secret_word(value):
        return value
    return strutils.mask_password(value, secret=SECRET)


# Exact types that are not mappings (a subclass goes the general way).
_PLAIN = frozenset([str, int, float, bool, type(None), list, tuple])


def _mask_dict(dictionary):
    if type(dictionary) is not dict:
        return strutils.mask_dict_password(dictionary, secret=SECRET)
    out = {}
    verdicts = _verdicts
    for key, value in dictionary.items():
        kind = type(value)
        if kind is dict:
            # As strutils: a mapping is descended into, whatever its key.
            out[key] = _mask_dict(value)
        elif kind in _PLAIN:
            # No mapping: the key decides first, then a string or a list
            # is masked, anything else kept.
            if type(key) is str:
                secret = verdicts.get(key)
                if secret is None:
                    secret = _holds_secret_word(key)
            else:
                secret = isinstance(key, str) and _key_names_secret(key)
            if secret:
                out[key] = SECRET
            elif kind is str:
                out[key] = _mask_string(value)
            elif kind is list or kind is tuple:
                out[key] = _mask_collection(value)
            else:
                out[key] = value
        elif isinstance(value, collections.abc.Mapping):
            out[key] = _mask_dict(value)
        elif isinstance(key, str) and _key_names_secret(key):
            out[key] = SECRET
        elif isinstance(value, str):
            out[key] = _mask_string(value)
        elif isinstance(value, collections.abc.Collection):
            out[key] = _mask_collection(value)
        else:
            out[key] = value
    return out


def _key_names_secret(key):
    if type(key) is str:
        return _holds_secret_word(key)
    return any(word in key.lower() for word in _WORDS)


def _mask_value(value):
    kind = type(value)
    if kind is str:
        return _mask_string(value)
    if kind is dict:
        return _mask_dict(value)
    if kind in _PLAIN and kind is not list and kind is not tuple:
        return value
    if isinstance(value, collections.abc.Mapping):
        return _mask_dict(value)
    if isinstance(value, str):
        return _mask_string(value)
    if isinstance(value, collections.abc.Collection):
        return _mask_collection(value)
    return value


def _mask_collection(values):
    # As strutils: a list stays a list, any other collection (tuple, set,
    # bytes...) becomes a tuple of its masked items.
    items = [_mask_value(v) for v in values]
    return items if isinstance(values, list) else tuple(items)


def mask_envelope(message):
    """``strutils.mask_dict_password(message)``, computed faster.

    Same result, types included, for any mapping: proven by the unit
    tests on the glance sample and on a fuzzed corpus.
    """
    if _WORDS is None:
        return strutils.mask_dict_password(message, secret=SECRET)
    return _mask_dict(message)


def redact_context(ctxt):
    """A JSON-friendly copy of ``ctxt`` without tokens or secrets."""
    if ctxt is None:
        return {}
    if hasattr(ctxt, 'redacted_copy'):
        ctxt = ctxt.redacted_copy()
    if hasattr(ctxt, 'to_dict'):
        ctxt = ctxt.to_dict()
    if not isinstance(ctxt, dict):
        return {}
    clean = {k: v for k, v in ctxt.items()
             if k not in _SECRET_CONTEXT_KEYS and
             not any(w in str(k).lower() for w in _SECRET_KEY_WORDS)}
    return mask_envelope(clean)


def _finite(value):
    """``value`` with every NaN and infinity replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def make_encoder():
    """Return a function that turns an envelope into one JSON line (str).

    Values JSON cannot hold go through oslo.serialization's to_primitive;
    NaN and infinities become null, as JSON has no such numbers (one rule
    whichever encoder runs: the line is always valid JSON). orjson, when
    installed, encodes the glance payload about ten times faster than the
    stdlib, which is most of this driver's cost per notification;
    whatever orjson refuses (integers beyond 64 bits, ...) is encoded by
    the stdlib instead, so the output never depends on it.
    """
    default = functools.partial(jsonutils.to_primitive,
                                convert_instances=True, fallback=repr)
    # Circular structures still fail (RecursionError, logged by notify());
    # skipping the check saves time on every notification.
    strict_encode = json.JSONEncoder(
        default=default, check_circular=False, ensure_ascii=True,
        allow_nan=False, separators=(',', ':')).encode

    def stdlib_encode(message):
        try:
            return strict_encode(message)
        except ValueError:
            # Rare enough to pay a second pass; to_primitive first, so
            # that non-finite floats inside other types are found too.
            return strict_encode(_finite(default(message)))

    if orjson is None:
        return stdlib_encode
    dumps = orjson.dumps
    # Datetimes go to to_primitive, as with the stdlib, so that subscribers
    # see the same text whichever encoder produced the line.
    options = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
    refused = orjson.JSONEncodeError

    def encode(message):
        try:
            return dumps(message, default=default,
                         option=options).decode('utf-8')
        except refused:
            return stdlib_encode(message)

    return encode


class _NotPlain(Exception):
    """A value JSON does not hold natively: masking must see it."""


_DATETIME_TYPES = (datetime.datetime, datetime.date, datetime.time)


def _make_plain_encoder(default):
    """An orjson encoder of plain JSON values only; None without orjson.

    Of a plain value (dicts with str keys, lists, tuples, str, numbers),
    the encoded text holds every key and string as they are (see
    _line_may_hold_secret), so the text tells whether
    masking would change anything. Anything else (subclasses, bytes,
    sets, objects, dataclasses, non-string keys) raises: masking converts
    some of those, and must walk them. The stdlib encoder takes
    subclasses of str for str, so without orjson every envelope is walked.
    One difference remains: orjson writes an Enum mixed with str as its
    value, where masking (and so the log driver) writes str() of it.
    """
    if orjson is None:
        return None

    def plain_default(value):
        # A date's text holds no letter of a secret word.
        if type(value) in _DATETIME_TYPES:
            return default(value)
        raise _NotPlain()

    dumps = orjson.dumps
    options = (orjson.OPT_PASSTHROUGH_DATETIME |
               orjson.OPT_PASSTHROUGH_SUBCLASS |
               orjson.OPT_PASSTHROUGH_DATACLASS)

    def encode(message):
        return dumps(message, default=plain_default,
                     option=options).decode('utf-8')
    return encode


def _line_may_hold_secret(line):
    """Whether masking could change the plain value ``line`` encodes.

    orjson writes keys and strings as they are, but for control
    characters, which it escapes and which never lowercase to a letter of
    a secret word: a word that a key or string holds, lowercased, is in
    the lowercased text too.
    """
    return _may_hold_secret_word(line.lower())


def make_line_encoder(mask=True):
    """Return ``encode(envelope) -> str``: the envelope masked, as JSON.

    With ``mask``, the result is the encoding of
    ``strutils.mask_dict_password(envelope)``, as oslo.messaging's log
    driver writes. Most envelopes hold no secret word at all: they are
    encoded once and the line is only scanned; the others are masked,
    then encoded.
    """
    encode = make_encoder()
    if not mask:
        return encode
    if _WORDS is None:
        return lambda message: encode(mask_envelope(message))
    default = functools.partial(jsonutils.to_primitive,
                                convert_instances=True, fallback=repr)
    plain_encode = _make_plain_encoder(default)
    if plain_encode is None:
        return lambda message: encode(mask_envelope(message))

    def masked_encode(message):
        try:
            line = plain_encode(message)
        except orjson.JSONEncodeError:
            # Not plain (orjson wraps _NotPlain), or a genuine failure,
            # which the full encoder raises again.
            line = None
        if line is not None and not _line_may_hold_secret(line):
            return line
        return encode(mask_envelope(message))

    return masked_encode


_source = None


def own_source():
    """This process incarnation's source: new in a forked child.

    Where no at-fork hook ran (uwsgi without --py-call-osafterfork), the
    changed pid shows the fork.
    """
    global _source
    source = _source
    if source is None or source[0] != os.getpid():
        pid = os.getpid()
        source = _source = (pid, '%d-%s' % (pid, os.urandom(6).hex()))
    return source[1]


class Sequence:
    """The sequence numbers of the lines of one socket path.

    Each process incarnation is a new source (:func:`own_source`), whose
    numbers restart at 1. ``number`` grows by one for every notification
    the driver was asked to send, sent or not: a subscriber counts what
    it missed of a source from the gap between two of its lines.
    """

    def __init__(self):
        self._renew()

    def _renew(self):
        self.source = own_source()
        self.pid = os.getpid()
        # Python's at-fork hook renews the source in a forked child;
        # uwsgi forks without running it unless --py-call-osafterfork,
        # so there the pid is compared at every line (a system call).
        self._check_pid = 'uwsgi' in sys.modules
        # next() on itertools.count is atomic: counting a notification
        # nobody hears costs no lock.
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def skip(self):
        """Count a notification that is not sent."""
        next(self._numbers)

    def publish(self, message, encode, publish):
        """Stamp ``message``, encode it with ``encode``, ``publish`` it.

        Under a lock, so that lines are published in the order of their
        numbers. If encoding fails, the number is spent: the notification
        is lost, and the gap says so.
        """
        if self._check_pid and self.pid != os.getpid():
            self._renew()
        with self._lock:
            stamped = dict(message)
            # The last key: a subscriber that reads raw lines finds it at
            # the end.
            stamped['sequence'] = {'source': self.source,
                                   'number': next(self._numbers)}
            publish(encode(stamped))


_sequences = {}
_sequences_lock = threading.Lock()


def sequence(path):
    """The :class:`Sequence` of ``path`` in this process."""
    with _sequences_lock:
        seq = _sequences.get(path)
        if seq is None:
            seq = _sequences[path] = Sequence()
        return seq


def _renew_after_fork():
    global _sequences_lock
    _sequences_lock = threading.Lock()
    for seq in _sequences.values():
        seq._renew()


os.register_at_fork(after_in_child=_renew_after_fork)
