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

"""Stand-in for the commands ``pip install -e PROJECT`` writes.

``python3 pip.py PROJECT_DIR BIN_DIR`` reads the console_scripts entry
points of ``PROJECT_DIR/setup.cfg`` and writes, for each, an executable
``BIN_DIR/NAME`` that runs it with this interpreter, as pip's wrappers do.
The tests run from an environment where the package is installed, so the
commands run the code under test.
"""

import configparser
import os
import sys

WRAPPER = '''#!{python}
import sys
from {module} import {function}
sys.exit({function}())
'''


def console_scripts(setup_cfg):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg)
    spec = parser.get('entry_points', 'console_scripts', fallback='')
    for line in spec.splitlines():
        if '=' in line:
            name, target = (part.strip() for part in line.split('=', 1))
            module, function = target.split(':')
            yield name, module, function


def main(project_dir, bin_dir):
    os.makedirs(bin_dir, exist_ok=True)
    for name, module, function in console_scripts(
            os.path.join(project_dir, 'setup.cfg')):
        path = os.path.join(bin_dir, name)
        with open(path, 'w') as f:
            f.write(WRAPPER.format(python=sys.executable, module=module,
                                   function=function))
        os.chmod(path, 0o755)
    return 0


if __name__ == '__main__':
    sys.exit(main(*sys.argv[1:]))
