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

"""Run the devstack plugin's phases without devstack.

devstack sources ``devstack/settings`` once, then sources
``devstack/plugin.sh MODE PHASE`` at each phase, with its own function
library loaded. :func:`run_plugin` does the same in a fresh bash, with
``functions.sh`` (minimal stand-ins of the devstack functions the plugin
calls) in place of that library. The unit tests use it to check the
configuration the plugin writes, and the glance functional job uses it to
write the glance-api.conf it runs glance with, so that both go through the
code path devstack runs.
"""

import collections
import grp
import os
import pwd
import subprocess
import sys

from oslo_config import cfg

HERE = os.path.dirname(os.path.abspath(__file__))
STANDINS = os.path.join(HERE, 'functions.sh')
STANDIN_INI = os.path.join(HERE, 'ini.py')
PLUGIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    HERE))), 'devstack')
PLUGIN = os.path.join(PLUGIN_DIR, 'plugin.sh')
SETTINGS = os.path.join(PLUGIN_DIR, 'settings')

# Like stack.sh: settings first, then plugin.sh with the phase arguments.
_SCRIPT = '''
set -o errexit
set -o pipefail
source "$STANDINS"
source "$SETTINGS"
source "$PLUGIN" "$@"
'''

PluginRun = collections.namedtuple(
    'PluginRun', ['returncode', 'stdout', 'stderr', 'calls'])


def current_user():
    return pwd.getpwuid(os.getuid()).pw_name


def current_group():
    return grp.getgrgid(os.getgid()).gr_name


def run_plugin(args, env, log_dir, timeout=60):
    """Source settings and plugin.sh with ``args`` as devstack would.

    :param args: the phase, e.g. ``['stack', 'post-config']``
    :param env: devstack's variables (``GLANCE_API_CONF``,
        ``ENABLED_SERVICES``, ``OSLO_MESSAGING_EXT_*``...); ``DEST`` and
        ``STACK_USER`` default to ``log_dir`` and the current user
    :param log_dir: where the record of stand-in calls is kept
    :returns: a :class:`PluginRun`; ``calls`` lists the recorded calls of
        ``define_plugin``, ``setup_develop`` and ``sudo``
    """
    if not os.path.exists(PLUGIN):
        raise RuntimeError('devstack plugin not found at %s: the tests run '
                           'from a source tree (tox usedevelop)' % PLUGIN)
    log = os.path.join(log_dir, 'standin-calls.log')
    full_env = {
        'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
        'HOME': log_dir,
        'LANG': 'C.UTF-8',
        'DEST': log_dir,
        'STACK_USER': current_user(),
        'ENABLED_SERVICES': '',
        'STANDINS': STANDINS,
        'SETTINGS': SETTINGS,
        'PLUGIN': PLUGIN,
        'STANDIN_PYTHON': sys.executable,
        'STANDIN_INI': STANDIN_INI,
        'STANDIN_LOG': log,
    }
    full_env.update(env)
    open(log, 'w').close()
    proc = subprocess.run(['bash', '-c', _SCRIPT, 'plugin.sh'] + list(args),
                          env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    with open(log) as f:
        calls = [line.rstrip('\n') for line in f]
    return PluginRun(proc.returncode, proc.stdout, proc.stderr, calls)


def read_ini(path):
    """Parse ``path`` as oslo.config does: {section: {option: [values]}}.

    Every option maps to the list of its values, so that multi-valued
    options (``driver``, ``selector``) can be checked line by line.
    """
    sections = {}
    cfg.ConfigParser(path, sections).parse()
    return sections
