"""Parse ``--config configs/x.py:arg --config.a.b=value ...`` plus a command's own absl flags from an argv list.

ml_collections registers the ``--config.*`` override flags from the argv it is given at definition time,
so every call builds a fresh ``FlagValues`` (commands can run many times in one process, e.g. in tests).
"""

from __future__ import annotations

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
    except (flags.Error, AttributeError, KeyError, TypeError) as err:  # unknown config fields raise AttributeError
        raise ValueError(f"{prog}: bad arguments: {err}") from err
    config = config_flag.value
    if config is None:
        raise ValueError(f"{prog}: --config is required, e.g. --config configs/synapse.py:b")
    return config, fv


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv)
