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

"""The INI stand-ins behave as devstack's functions in the cases we use.

The plugin tests are only as good as these stand-ins: an iniset that
appended where devstack replaces would hide a non-idempotent plugin.
"""

import os

import fixtures
from oslotest import base

from oslo_messaging_ext.tests.devstack import ini


class TestIniStandins(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.useFixture(fixtures.TempDir()).path,
                                 'x.conf')
        self.write('[DEFAULT]\na = 1\n\n[s]\nb = 2\nc=3\n\n[t]\nb = 9\n')

    def write(self, text):
        with open(self.path, 'w') as f:
            f.write(text)

    def read(self):
        with open(self.path) as f:
            return f.read()

    def test_iniset_replaces_in_place_within_the_section(self):
        ini.iniset(self.path, 's', 'c', '4')
        ini.iniset(self.path, 's', 'b', '  x   y ')
        self.assertEqual('[DEFAULT]\na = 1\n\n[s]\nb = x y\nc=4\n\n'
                         '[t]\nb = 9\n', self.read())

    def test_iniset_inserts_below_header_or_appends_section(self):
        ini.iniset(self.path, 't', 'new', 'v')
        ini.iniset(self.path, 'u', 'k', 'w')
        self.assertEqual('[DEFAULT]\na = 1\n\n[s]\nb = 2\nc=3\n\n'
                         '[t]\nnew = v\nb = 9\n\n[u]\nk = w\n', self.read())

    def test_iniset_creates_a_missing_file(self):
        os.unlink(self.path)
        ini.iniset(self.path, 's', 'k', 'v')
        self.assertEqual('\n[s]\nk = v\n', self.read())

    def test_iniset_multiline_rewrites_below_header_in_order(self):
        self.write('[s]\nx = 0\nd = old\ny = 1\nd = older\n')
        ini.iniset_multiline(self.path, 's', 'd', 'one', 'two three')
        self.assertEqual('[s]\nd = one\nd = two\nd = three\nx = 0\ny = 1\n',
                         self.read())

    def test_iniget_multiline_joins_values(self):
        self.write('[s]\nd = one\nd=two\n[t]\nd = three\n')
        self.assertEqual(['one', 'two'], self.capture_get('s', 'd'))
        self.assertEqual([], self.capture_get('s', 'missing'))

    def capture_get(self, section, option):
        out = self.useFixture(fixtures.StringStream('stdout'))
        self.useFixture(fixtures.MonkeyPatch('sys.stdout', out.stream))
        ini.iniget_multiline(self.path, section, option)
        out.stream.flush()
        return out.getDetails()['stdout'].as_text().split()

    def test_iniadd_appends_values(self):
        self.write('[s]\nd = one\n')
        ini.iniadd(self.path, 's', 'd', 'two')
        self.assertEqual('[s]\nd = one\nd = two\n', self.read())

    def test_inidelete_only_touches_the_section(self):
        ini.inidelete(self.path, 's', 'b')
        self.assertEqual('[DEFAULT]\na = 1\n\n[s]\nc=3\n\n[t]\nb = 9\n',
                         self.read())

    def test_missing_file_is_reported_but_not_fatal(self):
        missing = self.path + '.missing'
        self.assertEqual(0, ini.main(['inidelete', missing, 's', 'k']))
        self.assertEqual(1, ini.main(['ini_has_option', missing, 's', 'k']))
        self.assertEqual(0, ini.main(['ini_has_option', '-sudo', self.path,
                                      's', 'b']))
