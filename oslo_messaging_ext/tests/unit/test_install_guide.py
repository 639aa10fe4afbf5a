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

"""The install guide's commands, run as an operator copies them."""

import os
import re
import subprocess
import sys

from oslotest import base

GUIDE = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'doc',
                     'source', 'install', 'index.rst')


class InstallGuideTestCase(base.BaseTestCase):

    def test_driver_check_lists_both_drivers_and_says_nothing_else(self):
        with open(GUIDE, encoding='utf-8') as f:
            command = re.search(r'^    python3 -c "(.*)"$', f.read(),
                                re.M).group(1)
        result = subprocess.run([sys.executable, '-c', command],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual((0, ''), (result.returncode, result.stderr))
        self.assertIn("'messaging-multicast'", result.stdout)
        self.assertIn("'unix'", result.stdout)
