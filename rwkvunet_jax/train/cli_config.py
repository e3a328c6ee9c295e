"""Parse ``--config configs/x.py:arg --config.a.b=value ...`` plus a command's own absl flags from an argv list.

ml_collections registers the ``--config.*`` override flags from the argv it is given at definition time,
so every call builds a fresh ``FlagValues`` (commands can run many times in one process, e.g. in tests).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags


def parse_config_argv(
    argv: Sequence[str],
    *,
    prog: str,
    define_extra: Callable[[flags.FlagValues], None] | None = None,
    default_config: str | None = None,
) -> tuple[Any, flags.FlagValues]:
    """Returns ``(config, flag_values)``; the config has every ``--config.*`` override applied.

    Raises ValueError with the flag parser's message on unknown flags, bad values or a missing config.
    """
    from ml_collections import config_flags

    full_argv = [prog, *argv]
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", default_config, "config file and argument, e.g. configs/synapse.py:b", flag_values=fv,
        lock_config=True, sys_argv=full_argv)
    if define_extra is not None:
        define_extra(fv)
    try:
        fv(full_argv)
    except (AttributeError, KeyError) as err:  # ml_collections' answer to an override of a field that does not exist
        field = str(err.args[0] if err.args else err).strip("\"'")
        raise ValueError(f"{prog}: bad arguments: no config field {field!r} (check the --config.* overrides)") from err
    except (flags.Error, TypeError) as err:
        raise ValueError(f"{prog}: bad arguments: {err}") from err
    config = config_flag.value
    if config is None:
        raise ValueError(f"{prog}: --config is required, e.g. --config configs/synapse.py:b")
    return config, fv


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv)


def parse_command_argv(
    argv: Sequence[str],
    *,
    prog: str,
    doc: str,
    define_extra: Callable[[flags.FlagValues], None],
    required: str,
    required_hint: str = "",
) -> tuple[Any, flags.FlagValues] | int:
    """The front of every config-driven command: ``--help``, parsing, and the one flag it cannot run without.

    Returns ``(config, flag_values)``, or the exit code to return at once: 0 after printing ``doc`` for
    ``--help``, 2 after printing the problem to stderr (bad arguments, ``--<required>`` missing).
    """
    if wants_help(argv):
        print(doc)
        return 0
    try:
        config, fv = parse_config_argv(argv, prog=prog, define_extra=define_extra)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if not fv[required].value:
        print(f"{prog}: --{required} is required{required_hint}", file=sys.stderr)
        return 2
    return config, fv
