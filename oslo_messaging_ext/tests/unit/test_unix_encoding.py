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

"""Masking, encoding and sequence stamping of the unix driver's lines.

The masking must equal oslo.messaging's log driver's, which is
``strutils.mask_dict_password`` of the envelope: it is compared with it on
the recorded glance envelopes and on a corpus generated from a fixed seed.
"""

import collections
import datetime
import json
import os
import random
from unittest import mock

from oslo_config import cfg
from oslo_config import fixture as config_fixture
import oslo_messaging
from oslo_utils import strutils
from oslotest import base

import fixtures

from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext.notify import _unix_encoding
from oslo_messaging_ext import samples
from oslo_messaging_ext.tests import utils as test_utils
from oslo_messaging_ext import unix_subscriber

GROUP = 'oslo_messaging_notifications'

# Keys and strings the corpus is built from: secret words in several
# cases and spellings, lookalikes that must not match, characters that
# lowercase to ASCII letters (Kelvin sign), and the formats mask_password
# knows (key=value, quoted, XML, JSON, command-line options).
_KEYS = ['id', 'name', 'status', 'owner', 'Password', 'admin_password',
         'ADMINPASS', 'x_token', 'tok', 'pass', 'secret_uuid', 'sslKey',
         'ssl\u212aey', 'passport', 'properties', 'checksum', 'private_key',
         'configDrive', 'keystoneCredential', 'chap', 'word', 'caf\u00e9',
         'fsid', 'cephclusterfsid', '']
_STRINGS = ['active', 'raw', 'password=S3cret!', "password='S3cret!'",
            'admin_pass = "x y"', '--password hunter2 --user admin',
            '<password>p</password>', '{"auth_token": "abc"}',
            "{'adminPass': 'abc'}", 'token1=zz', 'PASSWORD=UP',
            'pass word=not', 'ssl\u212aey=kelvin', 'caf\u00e9 cr\u00e8me',
            'secret', 'no secrets here', 'new_pass: x', 'a\nb\tc',
            'sys_pswd=1', 'configdrive=H4sI', '\\u0070assword=esc', '']


def _random_string(rnd):
    if rnd.random() < 0.6:
        return rnd.choice(_STRINGS)
    parts = rnd.choices(_STRINGS + _KEYS + ['=', ' ', '"', "'", ':'],
                        k=rnd.randint(1, 6))
    return ''.join(parts)


def _random_value(rnd, depth):
    kind = rnd.random()
    if depth <= 0 or kind < 0.35:
        return rnd.choice([
            _random_string(rnd), rnd.randint(-5, 10 ** 6), 1.5, True, None,
            _random_string(rnd)])
    if kind < 0.6:
        return _random_dict(rnd, depth - 1)
    items = [_random_value(rnd, depth - 1)
             for _ in range(rnd.randint(0, 4))]
    shape = rnd.random()
    if shape < 0.6:
        return items
    if shape < 0.8:
        return tuple(items)
    return rnd.choice([b'password=raw', {'a', 'password=s'},
                       collections.OrderedDict(password='o'),
                       datetime.datetime(2026, 11, 22, 3, 0, 0)])


def _random_dict(rnd, depth):
    out = {}
    for _ in range(rnd.randint(0, 5)):
        key = rnd.choice(_KEYS) if rnd.random() < 0.9 else rnd.randint(0, 9)
        out[key] = _random_value(rnd, depth)
    return out


def corpus(count=3000, seed=20261204):
    rnd = random.Random(seed)
    envelopes = []
    for _ in range(count):
        envelope = dict(samples.glance_image_notifications()[
            rnd.randrange(6)])
        envelope['payload'] = _random_dict(rnd, rnd.randint(0, 4))
        if rnd.random() < 0.3:
            envelope[rnd.choice(_KEYS)] = _random_value(rnd, 2)
        envelopes.append(envelope)
    return envelopes


def with_secrets(envelope):
    """The envelope with secrets where glance could put them."""
    payload = dict(envelope['payload'], admin_password='S3cret!',
                   properties={'ssh_password': 'p', 'note': 'password=x'},
                   locations=[{'url': 'rbd://u:token=abc@host'}])
    return dict(envelope, payload=payload)


class MaskingTestCase(base.BaseTestCase):

    def encoders(self):
        """(line encoder, reference encoder) for orjson and the stdlib."""
        pairs = [(_unix_encoding.make_line_encoder(),
                  _unix_encoding.make_encoder())]
        with mock.patch.object(_unix_encoding, 'orjson', None):
            pairs.append((_unix_encoding.make_line_encoder(),
                          _unix_encoding.make_encoder()))
        return pairs

    def assertMaskedAsTheLogDriver(self, envelope):
        expected = strutils.mask_dict_password(envelope)
        self.assertEqual(expected, _unix_encoding.mask_envelope(envelope))
        for line_encode, encode in self.encoders():
            self.assertEqual(encode(expected), line_encode(envelope))

    def test_glance_sample_is_masked_as_the_log_driver_masks_it(self):
        for envelope in samples.glance_image_notifications():
            self.assertMaskedAsTheLogDriver(envelope)
            self.assertMaskedAsTheLogDriver(with_secrets(envelope))
            line = _unix_encoding.make_line_encoder()(with_secrets(envelope))
            self.assertNotIn('S3cret!', line)
            self.assertNotIn('abc', line)
            self.assertEqual('***', json.loads(line)['payload']
                             ['admin_password'])

    def test_fuzzed_corpus_is_masked_as_the_log_driver_masks_it(self):
        masked = 0
        for envelope in corpus():
            self.assertMaskedAsTheLogDriver(envelope)
            masked += strutils.mask_dict_password(envelope) != envelope
        # The corpus exercises both ways: most envelopes have something
        # masked, some have nothing.
        self.assertGreater(masked, 1000)
        self.assertLess(masked, 3000)

    def test_types_and_errors_are_those_of_strutils(self):
        envelope = {'a': (1, 'password=x'), 'b': b'ab', 'c': {1, 2},
                    'd': collections.OrderedDict(token='t'), 3: 'pass',
                    'password': {'nested': 'kept'}}
        self.assertEqual(strutils.mask_dict_password(envelope),
                         _unix_encoding.mask_envelope(envelope))
        self.assertIsInstance(_unix_encoding.mask_envelope(envelope)['a'],
                              tuple)
        self.assertRaises(TypeError, _unix_encoding.mask_envelope, ['x'])

    def test_strutils_is_called_only_for_strings_that_may_hold_secrets(self):
        envelope = samples.glance_image_notifications()[3]
        with mock.patch.object(strutils, 'mask_password') as mask_password:
            _unix_encoding.mask_envelope(envelope)
        mask_password.assert_not_called()

    def test_without_the_private_word_list_strutils_does_it_all(self):
        with mock.patch.object(_unix_encoding, '_WORDS', None):
            encode = _unix_encoding.make_line_encoder()
            envelope = with_secrets(samples.glance_image_notifications()[3])
            self.assertEqual('***', json.loads(encode(envelope))['payload']
                             ['admin_password'])
        with mock.patch.object(strutils, '_SANITIZE_KEYS', ['Token']):
            self.assertIsNone(_unix_encoding._secret_words())

    def test_every_secret_word_holds_an_anchor(self):
        for word in _unix_encoding._WORDS:
            self.assertTrue(_unix_encoding._may_hold_secret_word(word), word)


class SequenceTestCase(base.BaseTestCase):

    def test_numbers_count_skipped_notifications(self):
        sequence = _unix_encoding.Sequence()
        lines = []
        sequence.publish({'a': 1}, json.dumps, lines.append)
        sequence.skip()
        sequence.skip()
        sequence.publish({}, json.dumps, lines.append)
        stamps = [json.loads(line)['sequence'] for line in lines]
        self.assertEqual([1, 4], [s['number'] for s in stamps])
        self.assertEqual({sequence.source}, {s['source'] for s in stamps})
        self.assertEqual(1, json.loads(lines[0])['a'])

    def test_one_sequence_per_path_in_a_process(self):
        first = _unix_encoding.sequence('/run/a.sock')
        self.assertIs(first, _unix_encoding.sequence('/run/a.sock'))
        self.assertIsNot(first, _unix_encoding.sequence('/run/b.sock'))

    def test_a_child_forked_without_hooks_is_a_new_source(self):
        sequence = _unix_encoding.Sequence()
        lines = []
        sequence.publish({}, json.dumps, lines.append)
        with mock.patch.dict('sys.modules', uwsgi=mock.Mock()):
            sequence._renew()
            first_source = sequence.source
            with mock.patch('os.getpid', return_value=os.getpid() + 1):
                sequence.publish({}, json.dumps, lines.append)
        self.assertNotEqual(first_source, sequence.source)
        first, second = (json.loads(line)['sequence'] for line in lines)
        self.assertNotEqual(first['source'], second['source'])
        self.assertEqual(1, second['number'])

    def test_a_forked_child_is_a_new_source(self):
        sequence = _unix_encoding.sequence('/run/fork.sock')
        sequence.skip()
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                os.close(read_end)
                lines = []
                sequence.publish({}, json.dumps, lines.append)
                os.write(write_end, lines[0].encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        stamp = json.loads(os.read(read_end, 4096))['sequence']
        self.assertEqual(1, stamp['number'])
        self.assertNotEqual(sequence.source, stamp['source'])
        self.assertTrue(stamp['source'].startswith('%d-' % pid))


class DriverMaskingTestCase(base.BaseTestCase):
    """Through the driver, to a subscriber."""

    def setUp(self):
        super().setUp()
        tmpdir = self.useFixture(fixtures.TempDir()).path
        self.sock_path = os.path.join(tmpdir, 'notifications.sock')
        conf = self.useFixture(config_fixture.Config(cfg.ConfigOpts()))
        conf.conf([], project='unix-encoding-unit')
        _impl_unix.register_opts(conf.conf)
        conf.config(sock_path=self.sock_path, group=GROUP)
        transport = oslo_messaging.get_notification_transport(
            conf.conf, url='fake:/')
        self.addCleanup(transport.cleanup)
        self.driver = _impl_unix.UnixSocketDriver(conf.conf, ['n'],
                                                  transport)
        self.addCleanup(self.driver.close)

    def test_payload_passwords_never_reach_the_socket(self):
        self.assertTrue(test_utils.wait_until(
            lambda: os.path.exists(self.sock_path), 10, interval=0.005))
        sock = unix_subscriber.connect(self.sock_path)
        self.addCleanup(lambda: sock.close())
        self.assertTrue(test_utils.wait_until(
            lambda: self.driver.subscribers() == 1, 10, interval=0.005))
        envelopes = [with_secrets(e)
                     for e in samples.glance_image_notifications()]
        for envelope in envelopes:
            self.driver.notify({}, envelope, 'INFO', None)
        sock.settimeout(10)
        reader = sock.makefile('rb')
        self.addCleanup(reader.close)
        raw = [reader.readline() for _ in envelopes]
        self.assertFalse([line for line in raw if b'S3cret!' in line])
        received = [json.loads(line) for line in raw]
        self.assertEqual(
            [strutils.mask_dict_password(e)['payload'] for e in envelopes],
            [r['payload'] for r in received])
        numbers = [r['sequence']['number'] for r in received]
        self.assertEqual(list(range(numbers[0], numbers[0] + 6)), numbers)
