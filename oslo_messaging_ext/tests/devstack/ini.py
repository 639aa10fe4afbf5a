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

"""Stand-ins for devstack's INI functions (``inc/ini-config``).

``functions.sh`` routes ``iniset``, ``iniset_multiline``, ``iniadd``,
``iniget``, ``iniget_multiline``, ``inidelete`` and ``ini_has_option`` here
(``python3 ini.py NAME ARGS...``; run by path, so that it starts without
importing anything outside the standard library). They
reproduce the behaviour the plugin depends on, as devstack's sed scripts
have it:

- a section is every range from a ``[section]`` header to the next header;
  an option line is one that starts with ``option =`` (spaces optional);
- ``iniset`` replaces the value of existing lines of the option, or inserts
  ``option = value`` right below the header, appending the section (after
  a blank line) when the file does not have it; like devstack it collapses
  runs of whitespace in the value, as an unquoted ``echo`` does;
- ``iniset_multiline`` splits its values on whitespace, deletes the
  option's lines and inserts one line per value below the header, in the
  order given;
- ``iniget_multiline`` prints every value of the option on one line,
  separated by spaces;
- ``iniadd`` is ``iniget_multiline`` plus the new values, then
  ``iniset_multiline``;
- errors on a missing file are printed but, as in devstack, the function
  still succeeds (``ini_has_option`` answers false).
"""

import os
import re
import sys


def _read(path):
    with open(path) as f:
        return f.read().splitlines()


def _write(path, lines):
    tmp = '%s.ini-standin' % path
    with open(tmp, 'w') as f:
        f.write(''.join(line + '\n' for line in lines))
    os.replace(tmp, path)


def _is_header(line, section=None):
    if section is None:
        return re.match(r'\[.*\]', line) is not None
    return line.startswith('[%s]' % section)


def _option_re(option):
    return re.compile(r'%s[ \t]*=[ \t]*' % re.escape(option))


def _in_section(lines, section):
    """Yield the index of every line inside ``section`` (headers excluded)."""
    inside = False
    for index, line in enumerate(lines):
        if _is_header(line, section):
            inside = True
        elif _is_header(line):
            inside = False
        elif inside:
            yield index


def _option_lines(lines, section, option):
    pattern = _option_re(option)
    return [i for i in _in_section(lines, section)
            if pattern.match(lines[i])]


def _has_section(lines, section):
    return any(_is_header(line, section) for line in lines)


def _insert_below_headers(lines, section, new_lines):
    result = []
    for line in lines:
        result.append(line)
        if _is_header(line, section):
            result.extend(new_lines)
    return result


def _collapse(value):
    return ' '.join(value.split())


def iniset(path, section, option, value=''):
    lines = _read(path) if os.path.exists(path) else []
    value = _collapse(value)
    if not _has_section(lines, section):
        lines += ['', '[%s]' % section]
    existing = _option_lines(lines, section, option)
    if existing:
        pattern = _option_re(option)
        for i in existing:
            prefix = pattern.match(lines[i]).group(0)
            lines[i] = prefix + value
    else:
        lines = _insert_below_headers(
            lines, section, [f'{option} = {value}'])
    _write(path, lines)


def iniset_multiline(path, section, option, *values):
    lines = _read(path) if os.path.exists(path) else []
    values = ' '.join(values).split()
    if not _has_section(lines, section):
        lines += ['', '[%s]' % section]
    else:
        doomed = set(_option_lines(lines, section, option))
        lines = [line for i, line in enumerate(lines) if i not in doomed]
    lines = _insert_below_headers(
        lines, section, [f'{option} = {v}' for v in values])
    _write(path, lines)


def iniget_multiline(path, section, option):
    lines = _read(path)
    pattern = _option_re(option)
    values = [pattern.sub('', lines[i], count=1)
              for i in _option_lines(lines, section, option)]
    print(_collapse(' '.join(values)))


def iniget(path, section, option):
    lines = _read(path)
    found = _option_lines(lines, section, option)
    print(_collapse(lines[found[0]].split('=', 1)[1]) if found else '')


def iniadd(path, section, option, *values):
    lines = _read(path) if os.path.exists(path) else []
    pattern = _option_re(option)
    current = [pattern.sub('', lines[i], count=1)
               for i in _option_lines(lines, section, option)]
    iniset_multiline(path, section, option, *(current + list(values)))


def inidelete(path, section, option):
    lines = _read(path)
    doomed = set(_option_lines(lines, section, option))
    _write(path, [line for i, line in enumerate(lines) if i not in doomed])


def ini_has_option(path, section, option):
    return 0 if _option_lines(_read(path), section, option) else 1


FUNCTIONS = {f.__name__: f for f in (iniset, iniset_multiline, iniget,
                                     iniget_multiline, iniadd, inidelete,
                                     ini_has_option)}


def main(argv):
    name, args = argv[0], list(argv[1:])
    if args and args[0] == '-sudo':
        args.pop(0)
    try:
        status = FUNCTIONS[name](*args)
    except OSError as exc:
        # devstack's sed fails on a missing file, yet the function returns
        # the status of its last command, so callers carry on.
        print(f'{name}: {exc}', file=sys.stderr)
        return 1 if name == 'ini_has_option' else 0
    return status or 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
