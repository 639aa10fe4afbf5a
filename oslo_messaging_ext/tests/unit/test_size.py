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

"""The size budgets the issues set, kept as tests."""

import ast
import glob
import os

from oslotest import base

NOTIFY = os.path.join(os.path.dirname(__file__), '..', '..', 'notify')


def _lines(name):
    with open(os.path.join(NOTIFY, name)) as f:
        return f.read().count('\n')


class SizeTestCase(base.BaseTestCase):

    def test_unix_driver_hub_protocol_and_socket_files(self):
        # Issue 23: driver, hub, protocol and socket-file helpers together
        # at most 1,500 lines, their options counted in.
        modules = ('_impl_unix.py', '_unix_hub.py', '_unix_protocol.py',
                   '_unix_opts.py')
        self.assertLessEqual(sum(_lines(m) for m in modules), 1500)

    def test_no_class_over_300_lines(self):
        for path in glob.glob(os.path.join(NOTIFY, '*.py')):
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    size = node.end_lineno - node.lineno + 1
                    self.assertLessEqual(size, 300, '%s: class %s'
                                         % (os.path.basename(path),
                                            node.name))
