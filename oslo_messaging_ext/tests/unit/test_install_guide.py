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

"""Every command the README and the guides show, run as a user copies it.

The commands are extracted from the literal blocks of README.rst,
doc/source/**/*.rst and devstack/README.rst, and from the inline literals
of README.rst that start with a program. Each one is in COMMANDS, which
says how it is run here (paths such as /run/glance/notifications.sock
replaced by a temporary socket a service of the test serves) or why it is
not: a command added to the docs and not to COMMANDS fails
test_every_command_is_listed, as does an entry no doc shows any more.
Literal blocks that are not commands (configuration, output, code) are
recognised by their first line (NOT_COMMANDS); an unknown block fails too.
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import fixtures
from oslotest import base

from oslo_messaging_ext.tests import utils as test_utils

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..',
                                   '..'))
DOCS = (['README.rst', 'devstack/README.rst'] +
        sorted(os.path.relpath(p, TOP) for p in glob.glob(
            os.path.join(TOP, 'doc', 'source', '**', '*.rst'),
            recursive=True)))
GUIDE = os.path.join(TOP, 'doc', 'source', 'install', 'index.rst')
# What a command line starts with.
PROGRAMS = {'pip', 'python', 'python3', 'tox', 'socat', 'git', 'ps',
            'oslo-notify-tail', 'oslo-messaging-ext-check',
            'oslo-messaging-ext-demo', 'sudo', 'systemctl', 'journalctl',
            'jq', 'curl', 'openstack', './stack.sh', '.ci/run'}
# First lines of the literal blocks that are not commands, and what they
# are.
NOT_COMMANDS = [
    (r'^\[', 'a configuration file'),
    (r'^[{"]', 'JSON'),
    (r'^(from|import|class|def) ', 'Python'),
    (r'^\.\.\. \d+ ', 'log lines'),
    (r'^\d{4}-\d\d-\d\d ', "oslo-notify-tail's output"),
    (r'^oslo-notify-tail: ', "oslo-notify-tail's messages"),
    (r'^line \d+ ', "oslo-messaging-ext-check's output"),
    (r'^Invalid ', 'an error the driver logs'),
    (r'^messaging-multicast replication is', 'a warning the driver logs'),
    (r'^messaging-multicast (dropped|broker) ', 'lines the driver logs'),
    (r'^\.\. project-only-start$', 'an example of the series markers'),
]
SOCK = '/run/glance/notifications.sock'
DEVSTACK_SOCK = '/run/oslo-messaging-ext/glance-api.sock'
CONF = '/etc/glance/glance-api.conf'
TAIL_GLANCE = ("oslo-notify-tail -f -m 'event_type in image.upload,"
               "image.delete' -m 'payload.disk_format exact qcow2' " + SOCK)


def _ci_command():
    """The test command of README.rst, between its markers."""
    with open(os.path.join(TOP, 'README.rst')) as readme:
        text = readme.read()
    block = text.split('.. test-command-start')[1].split(
        '.. test-command-end')[0]
    return re.search(r'^    (tox .*)$', block, re.M).group(1)


CI = _ci_command()
SKIP_TOX = ('a tox environment: .ci/run runs each in CI, and the lead runs '
            'the benchmarks on a quiet machine')
# Every command the docs show: the test that runs it here, or ('skip',
# why not).
COMMANDS = {
    'pip install .': 'test_pip_install_puts_the_commands_on_path',
    'pip install oslo.messaging-ext': ('skip', 'downloads the package from '
                                       'the package index'),
    'python3 -m pip install tox': ('skip', 'installs tox from the package '
                                   'index'),
    "pip install 'oslo.messaging-ext[regex]'": ('skip', 'downloads the '
                                                'package from the package '
                                                'index'),
    'tox -e upstream-export -- --author "Full Name <email>"': (
        'skip', 'exports a series to propose, signed by a real author; CI '
        'runs the test-only export, tox -e upstream'),
    'python3 -c "from importlib.metadata import entry_points; '
    "print(sorted(e.name for e in entry_points(group='oslo.messaging."
    "notify.drivers')))\"":
        'test_driver_check_lists_both_drivers_and_says_nothing_else',
    'oslo-messaging-ext-check --config-file ' + CONF:
        'test_check_on_the_quick_start_configuration',
    'oslo-messaging-ext-check --config-file ' + CONF + ' notifications.jsonl':
        'test_check_with_recorded_notifications',
    'oslo-messaging-ext-check --config-file ' + CONF + ' [--config-dir '
    '/etc/glance/glance-api.conf.d] [--project glance] '
    '[NOTIFICATIONS.jsonl]':
        'test_check_synopsis_names_its_options',
    'oslo-messaging-ext-demo': 'test_demo',
    'oslo-messaging-ext-demo unix': 'test_demo',
    'oslo-messaging-ext-demo multicast': 'test_demo',
    'oslo-messaging-ext-demo multicast --transport-url '
    'rabbit://guest:guest@127.0.0.1:5672/': (
        'skip', 'needs RabbitMQ: the functional test test_demo_broker runs '
        'this demo on the real broker'),
    'oslo-notify-tail --follow ' + SOCK: 'test_tail_follow',
    'oslo-notify-tail --follow ' + DEVSTACK_SOCK: 'test_tail_follow',
    TAIL_GLANCE: 'test_tail_match_selects_as_the_guide_says',
    'oslo-notify-tail [--follow] [--count N] [-e GLOB]... [-p PRIORITY]... '
    '[-P GLOB]... [-m SELECTOR]... [--format auto|json|line] '
    '[--color auto|always|never] [--utc] [--stats [--interval SECONDS]] '
    'SOCK': 'test_tail_synopsis_names_its_options',
    'socat -u UNIX-CONNECT:%s - | jq .' % SOCK: 'test_socat_and_jq',
    '$ ps -ww -eo pid,ppid,sid,user,args | grep [_]unix_hub':
        'test_ps_shows_the_hub',
    CI: ('skip', 'the whole CI run, about 20 minutes: .ci/run runs it'),
    'tox -e unprivileged': ('skip', 'the second part of the CI run: '
                            '.ci/run runs it, as a user who is not root'),
    'tox -e bench': ('skip', SKIP_TOX),
    'tox -e docs': ('skip', SKIP_TOX),
    'tox -e genconfig': ('skip', SKIP_TOX),
    'tox -e py3': ('skip', SKIP_TOX),
    'tox -e functional-glance': ('skip', SKIP_TOX),
    'tox -e py3 -- test_devstack': ('skip', SKIP_TOX),
    'python -m oslo_messaging_ext.tests.functional_glance.notification_check '
    '--glance-api-conf ' + CONF + ' --recording '
    '/opt/stack/logs/glance-notifications.ndjson': (
        'skip', "needs a devstack run's glance-api and its recording: tox -e "
        'functional-glance runs it against a real glance-api'),
    'git am /path/to/oslo.messaging-ext/build/upstream-series/*.patch': (
        'skip', 'applies the exported series in an oslo.messaging checkout: '
        'tox -e upstream does'),
}

# A service of the test: emits the recorded glance life cycle through the
# unix driver, image.upload twice (disk_format qcow2, then raw), until
# killed.
_SERVICE = textwrap.dedent('''
    import sys, time
    from oslo_config import cfg
    import oslo_messaging
    from oslo_messaging_ext import samples
    conf = cfg.ConfigOpts()
    conf(['--config-file', sys.argv[1]], project='docs-service')
    transport = oslo_messaging.get_notification_transport(conf,
                                                          url='fake:/')
    notifier = oslo_messaging.Notifier(transport,
                                       publisher_id='image.localhost')
    payload = samples.glance_upload_payload()
    while True:
        for disk_format in ('qcow2', 'raw'):
            notifier.info({}, 'image.upload',
                          dict(payload, disk_format=disk_format))
        notifier.info({}, 'image.update', payload)
        time.sleep(0.02)  # a service's pace, not a synchronisation
''')


def literal_blocks(text):
    """(line number, lines) of each ``::`` literal block of rst ``text``."""
    lines = text.split('\n')
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith('::') or line.lstrip().startswith(
                '.. '):
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j == len(lines):
            return
        inner = len(lines[j]) - len(lines[j].lstrip())
        if inner <= indent:
            i += 1
            continue
        block = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(
                lines[j].lstrip()) >= inner):
            block.append(lines[j][inner:])
            j += 1
        yield i + 1, block
        i = j


def block_commands(block):
    """The commands of a command block, continuation lines joined.

    A line ending with a backslash, or one indented under a command (a
    synopsis), continues it.
    """
    prompt = block[0].startswith('$ ')
    commands, current = [], None
    for line in block:
        if not line.strip():
            continue
        if (current is None and commands and line[0] == ' ' and
                not prompt):
            commands[-1] += ' ' + ' '.join(line.split())
            continue
        if current is not None:
            current += ' ' + line.strip()
        elif prompt and not line.startswith('$ '):
            continue  # output
        else:
            current = line.strip()
        if current.endswith('\\'):
            current = current[:-1].rstrip()
            continue
        commands.append(' '.join(current.split()))
        current = None
    return commands


def _first_word(line):
    words = line[2:].split() if line.startswith('$ ') else line.split()
    return words[0] if words else ''


def doc_commands():
    """{command: where} of every doc, and the blocks nobody classified."""
    found, unknown = {}, []
    for name in DOCS:
        with open(os.path.join(TOP, name), encoding='utf-8') as f:
            text = f.read()
        for number, block in literal_blocks(text):
            first = next(line for line in block if line.strip())
            if _first_word(first) in PROGRAMS:
                for command in block_commands(block):
                    found.setdefault(command, '%s:%d' % (name, number))
            elif not any(re.search(pattern, first)
                         for pattern, _ in NOT_COMMANDS):
                unknown.append('%s:%d: %s' % (name, number, first))
        if name == 'README.rst':
            for literal in re.findall(r'``([^`]+)``', text):
                literal = ' '.join(literal.split())
                if _first_word(literal) in PROGRAMS and ' ' in literal:
                    found.setdefault(literal, name)
    return found, unknown


class DocCommandsTestCase(base.BaseTestCase):

    def setUp(self):
        super().setUp()
        self.tmpdir = self.useFixture(fixtures.TempDir()).path
        self.bin = os.path.dirname(sys.executable)
        self.env = dict(os.environ, PATH=self.bin + os.pathsep +
                        os.environ.get('PATH', ''), NO_COLOR='1')

    def test_every_command_is_listed(self):
        found, unknown = doc_commands()
        self.assertEqual([], unknown, 'literal blocks neither commands nor '
                         'known as something else: add them to NOT_COMMANDS '
                         'or PROGRAMS')
        self.assertEqual(
            [], sorted('%s (%s)' % (c, w) for c, w in found.items()
                       if c not in COMMANDS),
            'commands the docs show that COMMANDS does not list')
        self.assertEqual([], sorted(set(COMMANDS) - set(found)),
                         'COMMANDS lists commands no doc shows any more')

    def test_every_listed_command_runs_or_says_why_not(self):
        for command, how in COMMANDS.items():
            if isinstance(how, tuple):
                self.assertEqual('skip', how[0])
                self.assertTrue(how[1], command)
            else:
                self.assertTrue(callable(getattr(self, how, None)), command)

    # Each test below runs the commands COMMANDS gives it.

    def _commands(self, how):
        return [c for c, h in COMMANDS.items() if h == how]

    def run_doc(self, command, timeout=120, **kwargs):
        return subprocess.run(command, shell=True, capture_output=True,
                              text=True, timeout=timeout, env=self.env,
                              cwd=self.tmpdir, **kwargs)

    def test_pip_install_puts_the_commands_on_path(self):
        for _command in self._commands(
                'test_pip_install_puts_the_commands_on_path'):
            for program in ('oslo-messaging-ext-demo',
                            'oslo-messaging-ext-check', 'oslo-notify-tail'):
                self.assertTrue(os.access(os.path.join(self.bin, program),
                                          os.X_OK), program)

    def test_driver_check_lists_both_drivers_and_says_nothing_else(self):
        (command,) = self._commands(
            'test_driver_check_lists_both_drivers_and_says_nothing_else')
        with open(GUIDE, encoding='utf-8') as f:
            self.assertIn(command, f.read())
        result = self.run_doc(command.replace('python3', sys.executable, 1),
                              timeout=60)
        self.assertEqual((0, ''), (result.returncode, result.stderr))
        self.assertIn("'messaging-multicast'", result.stdout)
        self.assertIn("'unix'", result.stdout)

    def _glance_conf(self):
        """The quick start's configuration of the multicast guide."""
        with open(os.path.join(TOP, 'doc', 'source', 'admin',
                               'multicast.rst'), encoding='utf-8') as f:
            text = f.read()
        ini = re.search(r'Quick start.*?code-block:: ini\n\n(.*?)\n\S',
                        text, re.S).group(1)
        path = os.path.join(self.tmpdir, 'glance-api.conf')
        with open(path, 'w') as f:
            f.write(textwrap.dedent(ini))
        return path

    def test_check_on_the_quick_start_configuration(self):
        conf = self._glance_conf()
        for command in self._commands(
                'test_check_on_the_quick_start_configuration'):
            result = self.run_doc(command.replace(CONF, conf))
            self.assertEqual(0, result.returncode, result.stdout +
                             result.stderr)
            self.assertIn('glance_replication', result.stdout)

    def test_check_with_recorded_notifications(self):
        conf = self._glance_conf()
        shutil.copy(os.path.join(TOP, 'oslo_messaging_ext', 'samples',
                                 'glance-image-notifications.jsonl'),
                    os.path.join(self.tmpdir, 'notifications.jsonl'))
        for command in self._commands(
                'test_check_with_recorded_notifications'):
            result = self.run_doc(command.replace(CONF, conf))
            self.assertEqual(0, result.returncode, result.stdout +
                             result.stderr)
            self.assertRegex(result.stdout,
                             r'image\.upload .*glance_replication -> ')

    def assert_help_names_options(self, test):
        """The program of a synopsis has each option it shows."""
        for command in self._commands(test):
            result = self.run_doc(command.split()[0] + ' --help')
            self.assertEqual(0, result.returncode, result.stderr)
            for option in re.findall(r'(?<![\w-])-{1,2}[a-zA-Z][a-z-]*',
                                     command):
                self.assertIn(option, result.stdout)
            # And the choices of a --option a|b|c.
            for choices in re.findall(r' ([a-z]+(?:\|[a-z]+)+)\]', command):
                for value in choices.split('|'):
                    self.assertIn(value, result.stdout)

    def test_check_synopsis_names_its_options(self):
        self.assert_help_names_options(
            'test_check_synopsis_names_its_options')

    def test_demo(self):
        for command in self._commands('test_demo'):
            result = self.run_doc(command)
            self.assertEqual(0, result.returncode, result.stdout +
                             result.stderr)
            if not command.endswith('multicast'):
                self.assertIn('notifications relayed, none lost',
                              result.stdout)
            if not command.endswith('unix'):
                self.assertIn('Every notification and replica arrived',
                              result.stdout)

    def test_tail_synopsis_names_its_options(self):
        self.assert_help_names_options('test_tail_synopsis_names_its_options')

    # The commands that read a service's socket: a service of the test
    # serves a temporary one.

    def _service(self):
        sock = os.path.join(self.tmpdir, 'notifications.sock')
        conf = os.path.join(self.tmpdir, 'service.conf')
        with open(conf, 'w') as f:
            f.write('[oslo_messaging_notifications]\ndriver = unix\n'
                    'sock_path = %s\n' % sock)
        proc = subprocess.Popen([sys.executable, '-c', _SERVICE, conf],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=self.env,
                                start_new_session=True)
        self.addCleanup(self._stop, proc)
        # As a user runs these commands: against a service that serves.
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.fail('the service did not serve %s: %s'
                          % (sock, proc.stderr.read().decode()))
            time.sleep(0.02)  # polling for the socket, with a deadline
        return sock

    @staticmethod
    def _stop(proc):
        # Its process group, while it is not reaped: the pid of a child
        # already reaped (a ps that ended) may be another process's by
        # now (32768 pids here, and other tests start processes), and a
        # SIGTERM to its group could end another test's service.
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                # Seen once under tox -e cover, where coverage handles
                # SIGTERM itself (sigterm = true in .coveragerc): the
                # service outlived it by 30 s. These tests are about the
                # guides' commands, not about SIGTERM.
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def _read_until(self, command, pattern, timeout=60, again=False):
        """Run ``command`` until its output matches; return the output.

        ``again``: a command that ends at once (ps) is run again until its
        output matches.
        """
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.Popen(command, shell=True,
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self.env,
                                    cwd=self.tmpdir, start_new_session=True)
            self.addCleanup(self._stop, proc)
            os.set_blocking(proc.stdout.fileno(), False)
            out = ''
            while True:
                ended = proc.poll() is not None
                try:
                    out += os.read(proc.stdout.fileno(), 1 << 16).decode()
                except BlockingIOError:
                    pass
                if re.search(pattern, out, re.M):
                    return out
                if ended or time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # polling a pipe, with a deadline
            if not (again and ended) or time.monotonic() > deadline:
                self.fail('%r printed %r, then %s' % (
                    command, out, 'ended: %s' % proc.stderr.read().decode()
                    if ended else 'nothing matching in %d s' % timeout))

    def test_tail_follow(self):
        for command in self._commands('test_tail_follow'):
            sock = self._service()
            path = command.split()[-1]
            out = self._read_until(command.replace(path, sock),
                                   r'^\{.*"event_type":"image\.upload"')
            self.assertIn('"sequence"', out)

    def test_tail_match_selects_as_the_guide_says(self):
        for command in self._commands(
                'test_tail_match_selects_as_the_guide_says'):
            sock = self._service()
            out = self._read_until(command.replace(SOCK, sock) + ' --count 5'
                                   ' --format json',
                                   r'(^.*\n){5}')
            for line in out.splitlines():
                self.assertIn('"event_type":"image.upload"', line)
                self.assertIn('"disk_format":"qcow2"', line)

    def test_socat_and_jq(self):
        for tool in ('socat', 'jq'):
            test_utils.require_tool(self, tool, tool)
        for command in self._commands('test_socat_and_jq'):
            sock = self._service()
            out = self._read_until(command.replace(SOCK, sock),
                                   r'^  "sequence": \{')
            self.assertIn('"event_type": "image.', out)

    def test_ps_shows_the_hub(self):
        for command in self._commands('test_ps_shows_the_hub'):
            sock = self._service()
            out = self._read_until(command[2:],
                                   r'_unix_hub %s ' % re.escape(sock),
                                   again=True)
            self.assertIn(' -m oslo_messaging_ext.notify._unix_hub ', out)
