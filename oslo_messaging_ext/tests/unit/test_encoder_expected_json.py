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

"""The unix driver's line encoders against JSON written by hand.

Comparing the orjson encoder with the stdlib one proves they agree, not
that either is right: here both are held to the expected text.
"""

import datetime
import json
from unittest import mock

from oslotest import base

from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext.tests import utils as test_utils

ODD_VALUES = {'when': datetime.datetime(2026, 11, 22, 3, 0, 0),
              'tags': {'a'}, 'name': 'caf\u00e9', 7: None, 'ratio': 0.1,
              'nested': [{'deep': (1, 2)}], 'nan': float('nan'),
              'inf': [float('-inf')], 'big': 2 ** 70}

# Compact, ASCII only, datetimes as oslo.serialization writes them, sets
# and tuples as lists, keys as strings, non-finite floats as null.
EXPECTED_LINE = ('{"when":"2026-11-22T03:00:00.000000","tags":["a"],'
                 '"name":"caf\\u00e9","7":null,"ratio":0.1,'
                 '"nested":[{"deep":[1,2]}],"nan":null,"inf":[null],'
                 '"big":1180591620717411303424}')


class EncoderExpectedJsonTestCase(base.BaseTestCase):

    def test_stdlib_encoder_writes_the_expected_line(self):
        with mock.patch.object(_impl_unix, 'orjson', None):
            stdlib = _impl_unix.make_encoder()
        self.assertEqual(EXPECTED_LINE.encode(), stdlib(ODD_VALUES))

    def test_orjson_encoder_writes_the_same_values(self):
        if _impl_unix.orjson is None:
            test_utils.unavailable(self, 'orjson (optional: the orjson '
                                   'extra) is not installed')
        line = _impl_unix.make_encoder()(ODD_VALUES)
        self.assertNotIn(b'\n', line)
        self.assertEqual(json.loads(EXPECTED_LINE), json.loads(line))

    def test_orjson_retries_non_string_keys_with_the_same_values(self):
        if _impl_unix.orjson is None:
            test_utils.unavailable(self, 'orjson (optional: the orjson '
                                   'extra) is not installed')
        # orjson refuses these without OPT_NON_STR_KEYS, and takes them
        # with it: the encoder's second try.
        values = {'flavor': {1: 'small', 2.5: 'half'},
                  'when': datetime.datetime(2026, 11, 22, 3, 0, 0)}
        orjson = _impl_unix.orjson
        self.assertRaises(orjson.JSONEncodeError, orjson.dumps, values,
                          default=str)
        with mock.patch.object(_impl_unix, 'orjson', None):
            stdlib = _impl_unix.make_encoder()
        self.assertEqual(json.loads(stdlib(values)),
                         json.loads(_impl_unix.make_encoder()(values)))
