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

"""The specs of specs/ and their series for openstack/oslo-specs."""

import os
import re
from unittest import mock

import fixtures
from oslotest import base

from oslo_messaging_ext.tests.unit import test_export_identity


class SpecsTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tool = test_export_identity.load_tool()

    def source(self, path):
        return os.path.join(test_export_identity.SOURCE_TREE, 'specs', path)

    def test_each_spec_is_in_oslo_specs_form(self):
        self.assertEqual(2, len(self.tool.SPECS))
        for path, _, _, blueprint in self.tool.SPECS:
            self.assertEqual([], self.tool.spec_problems(self.source(path),
                                                         blueprint), path)

    def test_a_spec_missing_a_section_is_refused(self):
        path, _, _, blueprint = self.tool.SPECS[0]
        with open(self.source(path)) as f:
            text = f.read()
        broken = os.path.join(self.useFixture(fixtures.TempDir()).path,
                              blueprint + '.rst')
        with open(broken, 'w') as f:
            f.write(text.replace('Security impact\n', 'Security\n'))
            f.write('x' * 80 + '\n')
        problems = self.tool.spec_problems(broken, blueprint)
        self.assertIn("no section 'Security impact'", problems)
        self.assertTrue(any('longer than 79' in p for p in problems))
        self.assertEqual(['not named after its blueprint other'],
                         [p for p in self.tool.spec_problems(broken, 'other')
                          if 'named' in p])

    def test_series_applies_and_names_each_blueprint(self):
        tmp = self.useFixture(fixtures.TempDir()).path
        series = os.path.join(tmp, 'series')
        with mock.patch.multiple(self.tool, BUILD=tmp,
                                 TEST_SPECS_SERIES_DIR=series,
                                 AUTHOR=self.tool.TEST_IDENTITY,
                                 log=mock.Mock()):
            patches = self.tool.make_specs_series(test_only=True)
        self.assertEqual(len(self.tool.SPECS), len(patches))
        for patch, (path, subject, _, blueprint) in zip(patches,
                                                        self.tool.SPECS):
            with open(patch) as f:
                text = re.sub(r'\n[ \t]+', ' ', f.read())  # unfolded
            self.assertIn('[TEST-ONLY DO-NOT-SUBMIT PATCH', text)
            self.assertIn(subject, text)
            self.assertIn('\nImplements: blueprint %s\n' % blueprint, text)
            applied = os.path.join(tmp, 'oslo-specs-export', 'specs', path)
            with open(applied) as f, open(self.source(path)) as g:
                self.assertEqual(g.read(), f.read())
