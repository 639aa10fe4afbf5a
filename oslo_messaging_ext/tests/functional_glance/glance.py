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

"""A real glance-api under uwsgi, configured by the devstack plugin.

The fixture writes what devstack's ``configure_glance`` would (sqlite, the
file store, no keystone: the paste pipeline without authtoken and a policy
that makes the unauthenticated context admin), then runs the plugin's
``stack post-config`` phase on it, syncs the database and starts uwsgi with
the options devstack gives glance (master, lazy apps, threads enabled,
``thunder-lock``), on 127.0.0.1 and a free port. Everything lives in one
temporary directory. :meth:`GlanceAPI.stop` runs the plugin's ``unstack``
phase, then stops uwsgi, as devstack's unstack.sh does, then runs the
``clean`` phase, as clean.sh does after it.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import fixtures

from oslo_messaging_ext.tests import devstack

READY_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 80

# One line per request in uwsgi's log, so a failure can say which worker
# served what.
REQUEST_LOG_FORMAT = 'request pid=%(pid) %(method) %(uri) status=%(status)'
REQUEST_LOG_RE = re.compile(
    r'^request pid=(?P<pid>\d+) (?P<method>\S+) (?P<uri>\S+) '
    r'status=(?P<status>\d+)$', re.M)

GLANCE_API_CONF = """\
[DEFAULT]
log_file = {dir}/glance-api.log
node_staging_uri = file://{dir}/staging
transport_url = {transport_url}

[database]
connection = sqlite:///{dir}/glance.sqlite

[glance_store]
stores = file
default_store = file
filesystem_store_datadir = {dir}/images

[paste_deploy]
# The empty flavor selects the pipeline without keystone's authtoken.
flavor =
config_file = {prefix}/etc/glance/glance-api-paste.ini

[oslo_policy]
policy_file = {dir}/policy.yaml

[oslo_messaging_notifications]
driver = messagingv2
topics = {topic}
"""

# The unauthenticated context has no roles: make it admin so that the
# default rules let it add and delete images.
POLICY = '"context_is_admin": ""\n'

UWSGI_INI = """\
[uwsgi]
module = glance.wsgi.api:application
home = {prefix}
http-socket = 127.0.0.1:{port}
processes = {workers}
master = true
die-on-term = true
exit-on-reload = false
worker-reload-mercy = 10
enable-threads = true
thunder-lock = true
hook-master-start = unix_signal:15 gracefully_kill_them_all
buffer-size = 65535
add-header = Connection: close
lazy-apps = true
http-raw-body = true
http-chunked-input = true
http-auto-chunked = true
http-keepalive = false
socket-timeout = 30
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def tail(path, lines=LOG_TAIL_LINES):
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError as exc:
        return '(%s)' % exc


class GlanceError(Exception):
    pass


class GlanceAPI(fixtures.Fixture):
    """glance-api with the plugin's configuration, serving on a free port.

    :param base_dir: an empty directory the fixture owns
    :param transport_url: the broker
    :param topic: the notification topic glance uses (unique per run)
    :param replica_prefix: OSLO_MESSAGING_EXT_MULTICAST_PREFIX (unique per
        run)
    """

    def __init__(self, base_dir, transport_url, topic, replica_prefix,
                 workers=2):
        super().__init__()
        self.dir = base_dir
        self.transport_url = transport_url
        self.topic = topic
        self.replica_prefix = replica_prefix
        self.workers = workers
        self.conf_path = os.path.join(base_dir, 'glance-api.conf')
        self.log_path = os.path.join(base_dir, 'glance-api.log')
        self.uwsgi_log_path = os.path.join(base_dir, 'uwsgi.log')
        self.run_dir = os.path.join(base_dir, 'run')
        self.plugin_env = {
            'GLANCE_API_CONF': self.conf_path,
            'ENABLED_SERVICES': 'rabbit,g-api',
            'OSLO_MESSAGING_EXT_RUN_DIR': self.run_dir,
            'OSLO_MESSAGING_EXT_TMPFILES_CONF': os.path.join(
                base_dir, 'tmpfiles.conf'),
            'OSLO_MESSAGING_EXT_MULTICAST_PREFIX': replica_prefix,
        }
        self.process = None
        self.port = None
        self.graceful_stop = None
        self.socket_after_unstack = None

    def _setUp(self):
        self.write_devstack_config()
        self.run_plugin('stack', 'post-config')
        self.db_sync()
        self.addCleanup(self.stop)
        self.start()

    # Configuration -----------------------------------------------------

    def write_devstack_config(self):
        for sub in ('images', 'staging'):
            os.mkdir(os.path.join(self.dir, sub))
        with open(self.conf_path, 'w') as f:
            f.write(GLANCE_API_CONF.format(
                dir=self.dir, prefix=sys.prefix, topic=self.topic,
                transport_url=self.transport_url))
        with open(os.path.join(self.dir, 'policy.yaml'), 'w') as f:
            f.write(POLICY)

    def run_plugin(self, *phase):
        result = devstack.run_plugin(phase, self.plugin_env, self.dir)
        if result.returncode:
            raise GlanceError('devstack plugin %s failed (%s):\n%s'
                              % (' '.join(phase), result.returncode,
                                 result.stderr[-4000:]))
        return result

    def config(self):
        """glance-api.conf as written by the plugin, parsed."""
        return devstack.read_ini(self.conf_path)

    @property
    def sock_path(self):
        return self.config()['oslo_messaging_notifications']['sock_path'][0]

    def db_sync(self):
        proc = subprocess.run(
            [os.path.join(sys.prefix, 'bin', 'glance-manage'),
             '--config-file', self.conf_path, 'db', 'sync'],
            capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise GlanceError('glance-manage db sync failed (%s):\n%s'
                              % (proc.returncode, proc.stderr[-4000:]))

    # Process -----------------------------------------------------------

    def start(self):
        uwsgi = os.path.join(sys.prefix, 'bin', 'uwsgi')
        if not os.access(uwsgi, os.X_OK):
            raise GlanceError('%s is missing: run this job with '
                              '"tox -e functional-glance"' % uwsgi)
        self.port = free_port()
        ini = os.path.join(self.dir, 'glance-uwsgi.ini')
        with open(ini, 'w') as f:
            f.write(UWSGI_INI.format(prefix=sys.prefix, port=self.port,
                                     workers=self.workers))
        env = dict(os.environ, OS_GLANCE_CONFIG_DIR=self.dir)
        with open(self.uwsgi_log_path, 'ab') as log:
            # Its own session, so that stop() can reach every worker.
            self.process = subprocess.Popen(
                [uwsgi, '--ini', ini, '--logformat', REQUEST_LOG_FORMAT],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                cwd=self.dir, start_new_session=True)
        self.wait_ready()

    def wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GlanceError('uwsgi exited with %s before glance-api '
                                  'answered' % self.process.returncode)
            try:
                status, _ = self.request('GET', '/versions', timeout=5)
                if status == 200:
                    return
                last = 'HTTP %s' % status
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise GlanceError('glance-api did not answer on port %s within %ss '
                          '(last: %s)' % (self.port, READY_TIMEOUT, last))

    def stop(self):
        """unstack, stop uwsgi and its workers, then clean, as devstack.

        Whether the socket was still there after the plugin's unstack
        phase, with glance-api running, is kept in
        ``socket_after_unstack``.

        SIGTERM goes to the master only, as systemd stops devstack's uwsgi
        units (KillMode=process), and the master shuts its workers down
        gracefully. That does not always finish: a worker's SIGHUP handler
        (uwsgi's, in C) may run on any thread of the worker and exit from
        it, and Python's finalization then waits forever; seen here with
        messagingv2 alone too. What is left after STOP_TIMEOUT is killed.
        uwsgi runs in its own session, so its process group tells when
        every worker is gone.

        :returns: whether uwsgi stopped on SIGTERM alone
        """
        sock_path = self.sock_path
        self.run_plugin('unstack')
        self.socket_after_unstack = os.path.exists(sock_path)
        if self.process is None:
            self.run_plugin('clean')
            return True
        group = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        graceful = self._wait_group_gone(group)
        if not graceful:
            os.killpg(group, signal.SIGKILL)
            if not self._wait_group_gone(group):
                raise GlanceError('uwsgi processes of group %s survived '
                                  'SIGKILL' % group)
        self.process.wait()
        self.graceful_stop = graceful
        # The unix driver's hub, a process of its own session, leaves a
        # few seconds after the last worker, removing the socket; under
        # systemd, stopping the unit ends it with the rest.
        deadline = time.monotonic() + STOP_TIMEOUT
        while os.path.lexists(self.sock_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.run_plugin('clean')
        return graceful

    def _wait_group_gone(self, group):
        def gone():
            self.process.poll()
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return True
            return False
        deadline = time.monotonic() + STOP_TIMEOUT
        while not gone():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def served_by(self):
        """[(pid, method, uri, status)] from uwsgi's request log."""
        with open(self.uwsgi_log_path, errors='replace') as f:
            return [(int(m['pid']), m['method'], m['uri'], int(m['status']))
                    for m in REQUEST_LOG_RE.finditer(f.read())]

    def diagnostics(self):
        """What to show when the job fails."""
        return ('--- glance-api.conf ---\n%s\n--- glance-api.log (tail) ---\n'
                '%s\n--- uwsgi.log (tail) ---\n%s'
                % (tail(self.conf_path, 200), tail(self.log_path),
                   tail(self.uwsgi_log_path)))

    # Images v2 API -----------------------------------------------------

    def _connection(self, timeout):
        return http.client.HTTPConnection('127.0.0.1', self.port,
                                          timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=60):
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _expect(self, expected, method, path, status, body):
        if status != expected:
            raise GlanceError('%s %s answered %s, expected %s: %.500s'
                              % (method, path, status, expected, body))

    def create_image(self, name):
        body = json.dumps({'name': name, 'disk_format': 'raw',
                           'container_format': 'bare'})
        status, answer = self.request(
            'POST', '/v2/images', body=body,
            headers={'Content-Type': 'application/json'})
        self._expect(201, 'POST', '/v2/images', status, answer)
        return json.loads(answer)['id']

    def delete_image(self, image_id):
        path = '/v2/images/%s' % image_id
        status, answer = self.request('DELETE', path)
        self._expect(204, 'DELETE', path, status, answer)

    def image_status(self, image_id):
        path = '/v2/images/%s' % image_id
        status, answer = self.request('GET', path)
        self._expect(200, 'GET', path, status, answer)
        return json.loads(answer)['status']

    def wait_for_status(self, image_id, wanted, timeout=READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            status = self.image_status(image_id)
            if status == wanted:
                return
            if time.monotonic() >= deadline:
                raise GlanceError('image %s still %s after %ss, expected %s'
                                  % (image_id, status, timeout, wanted))
            time.sleep(0.05)

    def update_image(self, image_id, name, value):
        path = '/v2/images/%s' % image_id
        body = json.dumps([{'op': 'add', 'path': '/%s' % name,
                            'value': value}])
        status, answer = self.request(
            'PATCH', path, body=body, headers={
                'Content-Type':
                    'application/openstack-images-v2.1-json-patch'})
        self._expect(200, 'PATCH', path, status, answer)

    def start_upload(self, image_id, data):
        """Send the headers and the first half of the image data.

        The worker that accepted the connection stays busy with this
        request (one thread per worker, as devstack runs glance) until
        the returned function sends the rest and checks the answer. glance
        marks the image ``saving`` before it reads the data.
        """
        path = '/v2/images/%s/file' % image_id
        conn = self._connection(60)
        conn.putrequest('PUT', path)
        conn.putheader('Content-Type', 'application/octet-stream')
        conn.putheader('Content-Length', str(len(data)))
        conn.endheaders()
        half = len(data) // 2
        conn.send(data[:half])

        def finish():
            try:
                conn.send(data[half:])
                response = conn.getresponse()
                self._expect(204, 'PUT', path, response.status,
                             response.read())
            finally:
                conn.close()
        return finish
