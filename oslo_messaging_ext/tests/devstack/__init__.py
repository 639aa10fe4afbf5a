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

"""Run the devstack plugin's phases as devstack runs them, without devstack.

The tree is laid out as a devstack job of Zuul lays it out: the plugin's
repository checked out at ``$DEST/oslo.messaging-ext`` (its ``devstack/``
directory and ``setup.cfg``, copied from this source tree), cloning
forbidden (``ERROR_ON_CLONE=True``). A fresh bash loads ``functions.sh``
(stand-ins of the devstack functions the plugin calls) and ``plugins.sh``
(stand-ins of devstack's plugin machinery, ``enable_plugin`` to
``run_phase``, and of the order stack.sh, unstack.sh and clean.sh run it
in), sources a localrc holding the ``enable_plugin`` line, and runs
stack.sh's, unstack.sh's or clean.sh's part. The unit tests use it to
check what the plugin does, and the glance functional job uses it to write
the glance-api.conf it runs glance with, so that both go through the code
path devstack runs.
"""

import collections
import grp
import os
import pwd
import shutil
import subprocess
import sys

from oslo_config import cfg

HERE = os.path.dirname(os.path.abspath(__file__))
STANDINS = os.path.join(HERE, 'functions.sh')
MACHINERY = os.path.join(HERE, 'plugins.sh')
STANDIN_INI = os.path.join(HERE, 'ini.py')
STANDIN_PIP = os.path.join(HERE, 'pip.py')
SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
PLUGIN_DIR = os.path.join(SOURCE_TREE, 'devstack')
PLUGIN = os.path.join(PLUGIN_DIR, 'plugin.sh')
SETTINGS = os.path.join(PLUGIN_DIR, 'settings')
# What a checkout of the repository holds that devstack and pip read.
CHECKOUT_FILES = ('devstack', 'setup.cfg')

# The repository, and the plugin's name: the same, as devstack needs.
PLUGIN_NAME = 'oslo.messaging-ext'
PROJECT_URL = 'https://opendev.org/openstack/oslo.messaging-ext'
# The line devstack's local.conf writer in Zuul makes of the job's
# devstack_plugins: {oslo.messaging-ext: <url>}.
ZUUL_ENABLE_PLUGIN = 'enable_plugin %s %s' % (PLUGIN_NAME, PROJECT_URL)

# What each script does with plugins (see plugins.sh).
_SCRIPTS = {
    'stack': 'standin_stack_sh "${@:2}"',
    'unstack': 'standin_unstack_sh',
    'clean': 'standin_clean_sh',
    'source': 'fetch_plugins; run_phase override_defaults; run_phase source',
}

_SCRIPT = '''
set -o errexit
set -o pipefail
source "$STANDINS"
source "$MACHINERY"
source "$STANDIN_LOCALRC"
%s
'''

PluginRun = collections.namedtuple(
    'PluginRun', ['returncode', 'stdout', 'stderr', 'calls'])


def current_user():
    return pwd.getpwuid(os.getuid()).pw_name


def current_group():
    return grp.getgrgid(os.getgid()).gr_name


class Layout:
    """The directories of a devstack host, under ``root``."""

    def __init__(self, root):
        self.root = root
        self.dest = os.path.join(root, 'opt', 'stack')
        self.venv = os.path.join(self.dest, 'data', 'venv')
        self.system_bin = os.path.join(root, 'usr', 'local', 'bin')

    def checkout(self, name=PLUGIN_NAME):
        """Check the plugin's repository out at ``$DEST/name``, as Zuul."""
        path = os.path.join(self.dest, name)
        os.makedirs(path, exist_ok=True)
        for entry in CHECKOUT_FILES:
            source = os.path.join(SOURCE_TREE, entry)
            target = os.path.join(path, entry)
            if os.path.isdir(source):
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy(source, target)
        return path


def run_plugin(args, env, log_dir, timeout=60, localrc=ZUUL_ENABLE_PLUGIN,
               checkout_name=PLUGIN_NAME):
    """Run the part of a devstack script that drives the plugin.

    :param args: ``['stack']`` for every stack phase, ``['stack', PHASE]``
        for stack.sh's loading of the plugin and that phase only,
        ``['unstack']``, ``['clean']``, or ``['source']`` for the loading
        alone
    :param env: devstack's variables (``GLANCE_API_CONF``,
        ``ENABLED_SERVICES``, ``OSLO_MESSAGING_EXT_*``...); ``STACK_USER``
        defaults to the current user, ``ERROR_ON_CLONE`` to True
    :param log_dir: the host's root (see :class:`Layout`) and where the
        record of stand-in calls is kept
    :param localrc: the localrc section of local.conf
    :param checkout_name: where in ``$DEST`` the repository is checked out
    :returns: a :class:`PluginRun`; ``calls`` lists the recorded calls of
        ``define_plugin``, ``setup_develop`` and ``sudo``
    """
    if not os.path.exists(PLUGIN):
        raise RuntimeError('devstack plugin not found at %s: the tests run '
                           'from a source tree (tox usedevelop)' % PLUGIN)
    layout = Layout(log_dir)
    layout.checkout(checkout_name)
    log = os.path.join(log_dir, 'standin-calls.log')
    localrc_path = os.path.join(log_dir, 'localrc')
    with open(localrc_path, 'w') as f:
        f.write(localrc + '\n')
    full_env = {
        'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
        'HOME': log_dir,
        'LANG': 'C.UTF-8',
        'DEST': layout.dest,
        'ERROR_ON_CLONE': 'True',
        'GLOBAL_VENV': 'True',
        'DEVSTACK_VENV': layout.venv,
        'STACK_USER': current_user(),
        'ENABLED_SERVICES': '',
        # /usr/local/bin on a real host, not writable here.
        'OSLO_MESSAGING_EXT_BIN_LINK_DIR': layout.system_bin,
        'STANDINS': STANDINS,
        'MACHINERY': MACHINERY,
        'STANDIN_LOCALRC': localrc_path,
        'STANDIN_PYTHON': sys.executable,
        'STANDIN_INI': STANDIN_INI,
        'STANDIN_PIP': STANDIN_PIP,
        'STANDIN_SYSTEM_BIN': layout.system_bin,
        'STANDIN_LOG': log,
    }
    full_env.update(env)
    os.makedirs(layout.system_bin, exist_ok=True)
    open(log, 'w').close()
    script = _SCRIPT % _SCRIPTS[args[0]]
    proc = subprocess.run(['bash', '-c', script, 'devstack'] + list(args),
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
