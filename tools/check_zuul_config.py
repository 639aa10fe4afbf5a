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

"""Check the Zuul configuration offline (tox -e zuul).

Zuul itself only reads .zuul.yaml once a change is proposed; this finds
before then what it would reject or what would fail at run time:

* .zuul.yaml's items, jobs and projects use only the attributes Zuul's
  configuration reference documents (job, project, project-template,
  nodeset, secret, semaphore, queue, pragma), with the types it gives;
* jobs and templates not defined here are ones this project means to use
  from OpenStack's shared configuration (a typo is not a new job);
* playbooks named exist, pass ``ansible-playbook --syntax-check`` and
  ``ansible-lint`` (roles that Zuul provides from other repositories are
  replaced by empty stand-ins);
* variables that point into the tree match it: tox_envlist names tox
  environments, bindep_profile names profiles bindep.txt uses, and
  devstack_plugins enables the plugin under the name its settings define.

Exit status 0 when everything passes, 1 otherwise, listing every problem.
"""

import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZUUL_YAML = os.path.join(ROOT, '.zuul.yaml')

# Zuul's configuration reference, "Job" and "Project" pages.
JOB_ATTRIBUTES = {
    'name': str, 'parent': (str, type(None)), 'description': str,
    'final': bool, 'protected': bool, 'abstract': bool,
    'intermediate': bool, 'attribute-control': dict,
    'success-message': str, 'failure-message': str,
    'hold-following-changes': bool, 'voting': bool,
    'semaphore': str, 'semaphores': (str, list, dict),
    'tags': (str, list), 'provides': (str, list), 'requires': (str, list),
    'secrets': (str, list), 'nodeset': (str, dict),
    'override-checkout': str, 'pre-timeout': int, 'timeout': int,
    'post-timeout': int, 'attempts': int,
    'pre-run': (str, list), 'post-run': (str, list),
    'cleanup-run': (str, list), 'run': (str, list),
    'ansible-split-streams': bool, 'ansible-version': (str, int, float),
    'roles': list, 'required-projects': (str, list), 'vars': dict,
    'extra-vars': dict, 'host-vars': dict, 'group-vars': dict,
    'include-vars': (str, list, dict), 'dependencies': (str, list),
    'allowed-projects': (str, list), 'post-review': bool,
    'branches': (str, list), 'files': (str, list),
    'irrelevant-files': (str, list), 'match-on-config-updates': bool,
    'deduplicate': (bool, str), 'failure-output': (str, list),
    'workspace-checkout': (bool, str), 'workspace-scheme': str,
}
PROJECT_ATTRIBUTES = {
    'name': (str, list), 'templates': list, 'branches': (str, list),
    'default-branch': str, 'merge-mode': str, 'vars': dict, 'queue': str,
}
PROJECT_PIPELINE_ATTRIBUTES = {'jobs': list, 'debug': bool,
                               'fail-fast': bool}
MERGE_MODES = {'merge', 'merge-resolve', 'merge-recursive', 'merge-ort',
               'cherry-pick', 'squash-merge', 'rebase'}
ITEMS = {'job', 'project', 'project-template', 'nodeset', 'secret',
         'semaphore', 'queue', 'pragma'}
# OpenStack's pipelines a project may name.
PIPELINES = {'check', 'gate', 'post', 'promote', 'release', 'tag',
             'pre-release', 'experimental', 'periodic', 'periodic-weekly',
             'periodic-stable', 'check-arm64', 'release-approval'}

# What this project takes from OpenStack's shared configuration
# (openstack-zuul-jobs, devstack, tempest, zuul-jobs).
EXTERNAL_TEMPLATES = {
    'openstack-python3-jobs', 'openstack-cover-jobs',
    'publish-openstack-docs-pti', 'release-notes-jobs-python3',
}
EXTERNAL_JOBS = {'openstack-tox', 'devstack-tempest'}
EXTERNAL_ROLES = {
    'orchestrate-devstack', 'setup-tempest-run-dir',
    'setup-tempest-data-dir', 'acl-devstack-files', 'run-tempest',
}


class ZuulLoader(yaml.SafeLoader):
    """YAML with Zuul's tags (override control, encrypted, unsafe)."""


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


ZuulLoader.add_multi_constructor('!', _tagged)


def _types(expected):
    return expected if isinstance(expected, tuple) else (expected,)


def _check_attributes(where, mapping, attributes, problems):
    if not isinstance(mapping, dict):
        problems.append('%s: a mapping is expected, got %r'
                        % (where, mapping))
        return False
    for key, value in mapping.items():
        if key not in attributes:
            problems.append('%s: unknown attribute %r' % (where, key))
        elif not isinstance(value, _types(attributes[key])):
            problems.append('%s: %s is a %s, expected %s' % (
                where, key, type(value).__name__,
                ' or '.join(t.__name__ for t in _types(attributes[key]))))
    return True


def _as_list(value):
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _playbooks(job):
    for key in ('pre-run', 'run', 'post-run', 'cleanup-run'):
        for entry in _as_list(job.get(key)):
            yield entry['name'] if isinstance(entry, dict) else entry


def check_job(job, problems):
    where = 'job %s' % job.get('name', '?')
    if not _check_attributes(where, job, JOB_ATTRIBUTES, problems):
        return
    if 'name' not in job:
        problems.append('%s: no name' % where)
    for path in _playbooks(job):
        if not os.path.isfile(os.path.join(ROOT, path)):
            problems.append('%s: playbook %s does not exist' % (where, path))
    for regex in (_as_list(job.get('files')) +
                  _as_list(job.get('irrelevant-files'))):
        try:
            re.compile(regex)
        except re.error as exc:
            problems.append('%s: bad file regex %r: %s'
                            % (where, regex, exc))


def check_project(project, jobs, problems, where='project'):
    attributes = dict(PROJECT_ATTRIBUTES,
                      **{p: dict for p in PIPELINES})
    if not _check_attributes(where, project, attributes, problems):
        return
    if project.get('merge-mode', 'merge-resolve') not in MERGE_MODES:
        problems.append('%s: merge-mode %r' % (where,
                                               project['merge-mode']))
    for template in project.get('templates', []):
        if template not in EXTERNAL_TEMPLATES:
            problems.append('%s: unknown project template %r'
                            % (where, template))
    for pipeline in PIPELINES & set(project):
        stanza = project[pipeline]
        here = '%s pipeline %s' % (where, pipeline)
        _check_attributes(here, stanza, PROJECT_PIPELINE_ATTRIBUTES,
                          problems)
        if 'jobs' not in stanza:
            problems.append('%s: no jobs' % here)
        for entry in stanza.get('jobs', []):
            if isinstance(entry, dict):
                if len(entry) != 1:
                    problems.append('%s: a job variant names one job: %r'
                                    % (here, entry))
                    continue
                (name, variant), = entry.items()
                check_job(dict(variant or {}, name=name), problems)
            else:
                name = entry
            if name not in jobs and name not in EXTERNAL_JOBS:
                problems.append('%s: job %r is defined nowhere'
                                % (here, name))


def _tox_envs():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, 'tox.ini'))
    envs = {s.split(':', 1)[1] for s in parser.sections()
            if s.startswith('testenv:')}
    return envs | {'py3', 'all'}


def _bindep_profiles():
    profiles = set()
    with open(os.path.join(ROOT, 'bindep.txt')) as f:
        for line in f:
            line = line.split('#', 1)[0]
            for selectors in re.findall(r'\[([^]]*)\]', line):
                profiles.update(s.lstrip('!') for s in selectors.split()
                                if not s.lstrip('!').startswith('platform:'))
    return profiles


def _defined_plugin():
    with open(os.path.join(ROOT, 'devstack', 'settings')) as f:
        return re.findall(r'^define_plugin\s+(\S+)', f.read(), re.M)


def check_vars(job, problems):
    where = 'job %s' % job['name']
    variables = job.get('vars', {})
    envs = _tox_envs()
    for env in str(variables.get('tox_envlist', '')).split(','):
        if env and env not in envs:
            problems.append('%s: tox_envlist names %r, not in tox.ini'
                            % (where, env))
    profiles = _bindep_profiles()
    for profile in str(variables.get('bindep_profile', '')).split():
        if profile not in profiles:
            problems.append('%s: bindep_profile %r is in no selector of '
                            'bindep.txt' % (where, profile))
    plugins = variables.get('devstack_plugins', {})
    for name in plugins:
        if name.startswith('oslo') and [name] != _defined_plugin():
            problems.append('%s: devstack_plugins enables %r, '
                            'devstack/settings defines %s'
                            % (where, name, _defined_plugin()))


def check_zuul_yaml(problems):
    with open(ZUUL_YAML) as f:
        items = yaml.load(f, Loader=ZuulLoader)
    if not isinstance(items, list):
        problems.append('.zuul.yaml: a list of items is expected')
        return []
    jobs, projects = {}, []
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            problems.append('.zuul.yaml: an item is a mapping of one key: '
                            '%.100r' % (item,))
            continue
        (kind, body), = item.items()
        if kind not in ITEMS:
            problems.append('.zuul.yaml: unknown item %r' % kind)
        elif kind == 'job':
            check_job(body, problems)
            if isinstance(body, dict) and 'name' in body:
                jobs[body['name']] = body
        elif kind in ('project', 'project-template'):
            projects.append((kind, body))
    for job in jobs.values():
        parent = job.get('parent')
        if parent and parent not in jobs and parent not in EXTERNAL_JOBS:
            problems.append('job %s: parent %r is defined nowhere'
                            % (job['name'], parent))
        check_vars(job, problems)
    for kind, body in projects:
        check_project(body, jobs, problems, where=kind)
    return sorted({p for job in jobs.values() for p in _playbooks(job)})


def _roles_used(playbook_path):
    with open(playbook_path) as f:
        plays = yaml.safe_load(f) or []
    names = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == 'roles':
                    names.update(r['role'] if isinstance(r, dict) else r
                                 for r in value)
                elif key.endswith(('include_role', 'import_role')):
                    names.add(value['name'])
                else:
                    walk(value)
        elif isinstance(node, list):
            for child in node:
                walk(child)
    walk(plays)
    return names


def _tool(name, problems):
    """The command ``name`` of this environment, else of PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    found = beside if os.access(beside, os.X_OK) else shutil.which(name)
    if not found:
        problems.append('%s is not installed: run this with tox -e zuul'
                        % name)
    return found


def check_playbooks(playbooks, problems):
    paths = [os.path.join(ROOT, p) for p in playbooks]
    ansible_playbook = _tool('ansible-playbook', problems)
    ansible_lint = _tool('ansible-lint', problems)
    if not (ansible_playbook and ansible_lint):
        return
    roles = set()
    for path in paths:
        roles |= _roles_used(path)
    unknown = roles - EXTERNAL_ROLES
    if unknown:
        problems.append('playbooks use roles Zuul does not provide: %s'
                        % sorted(unknown))
    with tempfile.TemporaryDirectory() as tmp:
        for role in roles:
            tasks = os.path.join(tmp, 'roles', role, 'tasks')
            os.makedirs(tasks)
            with open(os.path.join(tasks, 'main.yaml'), 'w') as f:
                f.write('[]\n')
        env = dict(os.environ, ANSIBLE_ROLES_PATH=os.path.join(tmp, 'roles'),
                   ANSIBLE_LOCAL_TEMP=os.path.join(tmp, 'ansible-tmp'),
                   ANSIBLE_HOME=os.path.join(tmp, 'ansible-home'),
                   ANSIBLE_NOCOLOR='1', NO_COLOR='1')
        for path in paths:
            proc = subprocess.run(
                [ansible_playbook, '--syntax-check', '-i', 'localhost,',
                 path], env=env, capture_output=True, text=True)
            if proc.returncode:
                problems.append('ansible-playbook --syntax-check %s:\n%s'
                                % (path, proc.stdout + proc.stderr))
        lint_config = os.path.join(tmp, 'ansible-lint.yaml')
        with open(lint_config, 'w') as f:
            yaml.safe_dump({'mock_roles': sorted(roles), 'offline': True,
                            'profile': 'production'}, f)
        proc = subprocess.run(
            [ansible_lint, '--offline', '-c', lint_config] + paths,
            env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            problems.append('ansible-lint:\n%s' % (proc.stdout + proc.stderr))


def main():
    problems = []
    playbooks = check_zuul_yaml(problems)
    check_playbooks(playbooks, problems)
    for problem in problems:
        print('FAIL: %s' % problem)
    if not problems:
        print('.zuul.yaml and %d playbooks: OK' % len(playbooks))
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
