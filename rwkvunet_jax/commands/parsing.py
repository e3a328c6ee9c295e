"""Argument parsing shared by every ``rwkvunet`` subcommand: one flag style (argparse), one-line errors, configs.

Every subcommand builds its parser with :func:`command_parser`; a bad argument raises :class:`CommandError`,
which ``rwkvunet_jax.cli`` prints as one line (``rwkvunet <command>: <problem>``) with exit status 2.

Config-driven commands also take ``--config FILE[:ARG]`` (an ml_collections config file, ``get_config(ARG)``)
and any number of ``--config.FIELD=VALUE`` overrides. The file is loaded here; the overrides are
checked against the config's fields here (a misspelt field gets a suggestion, a field's older name
gets the new one) and parsed into the fields' types by ``ml_collections.config_flags``. A relative
``configs/NAME.py`` that does not exist from the current directory is looked up in the project's own
configs (the source checkout's ``configs/``, or the copy installed as ``rwkvunet_jax/configs``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

OVERRIDE_PREFIX = "--config."
OVERRIDE_HELP = """config overrides:
  --config.FIELD=VALUE  set one field of the config (repeatable), e.g. --config.optim.lr=5e-4 or
                        --config.model.depths='(1,1,2,2)'; the config file's docstring lists its fields"""


class CommandError(ValueError):
    """A problem with a command's arguments or inputs, printed as one line (no traceback), exit ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors (unknown flag, missing value) become one line too
        raise CommandError(f"{message} (see '{self.prog} --help')")


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The argparse parser of one subcommand: ``--help`` lists every flag, errors raise :class:`CommandError`."""
    return _Parser(prog=prog, description=description.replace("``", "`"),
                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_argument(parser: argparse.ArgumentParser, example: str, *, default: str | None = None) -> None:
    """``--config FILE[:ARG]`` (``example`` is what the help and the missing-config error suggest)."""
    parser.add_argument("--config", metavar="FILE[:ARG]", default=default,
                        help=f"config file and its argument, e.g. {example}"
                        + (f" (default: {default})" if default else " (required)"))
    parser.epilog = "\n\n".join(p for p in (OVERRIDE_HELP, parser.epilog) if p)


def parse_config_command(parser: argparse.ArgumentParser, argv: Sequence[str], *, example: str,
                         required: Sequence[str] = ()) -> tuple[Any, argparse.Namespace]:
    """``(config with the overrides applied, the other arguments)`` of a config-driven command.

    ``required`` names flags (argparse dests) that must be given; they are checked after ``--config`` so
    that a bare command first asks for its config.
    """
    overrides, rest = split_overrides(argv)
    args = parser.parse_args(rest)
    if not args.config:
        raise CommandError(f"--config is required, e.g. --config {example}")
    for dest in required:
        if getattr(args, dest) in (None, ""):
            raise CommandError(f"--{dest.replace('_', '-')} is required (see '{parser.prog} --help')")
    return load_config(args.config, overrides), args


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(["--config.a.b=v", ...], other arguments)``; ``--config.a.b v`` becomes ``--config.a.b=v``."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith(OVERRIDE_PREFIX):
            if "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                token, i = f"{token}={argv[i + 1]}", i + 1
            overrides.append(token)
        else:
            rest.append(token)
        i += 1
    return overrides, rest


def load_config(spec: str, overrides: Sequence[str] = ()) -> Any:
    """The config of ``FILE[:ARG]`` with ``--config.FIELD=VALUE`` ``overrides`` applied (locked).

    Raises :class:`CommandError` for a missing file, a file without ``get_config``, an argument the
    config rejects, an unknown field or a value of the wrong type.
    """
    text, arg = split_spec(spec)
    path = resolve_config_file(text)
    config = _get_config(path, arg, spec)
    return apply_overrides(config, overrides)


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"configs/synapse.py:b,official"`` -> ``("configs/synapse.py", "b,official")`` (also ``"synapse:b"``)."""
    head, sep, arg = spec.partition(".py:")
    if sep:
        return head + ".py", arg
    head, sep, arg = spec.partition(":")
    if sep and not Path(spec).exists():
        return head, arg
    return spec, None


def config_dirs() -> list[Path]:
    """The project's config folders: the source checkout's ``configs/`` and the installed ``rwkvunet_jax/configs``."""
    package = Path(__file__).resolve().parents[1]
    found = []
    for folder in (package.parent / "configs", package / "configs"):
        # common.py + demo.py tell our configs from any other folder that happens to be called configs.
        if (folder / "common.py").is_file() and (folder / "demo.py").is_file() and folder not in found:
            found.append(folder)
    return found


def resolve_config_file(text: str) -> Path:
    """The config file ``text`` names: as given, else (``configs/NAME.py`` or ``NAME[.py]``) the project's own."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise CommandError(f"--config {text} is a folder; pass a config file, e.g. {text.rstrip('/')}/synapse.py:b")
    name = path.name if path.suffix == ".py" else f"{path.name}.py"
    project = config_dirs()
    if not path.is_absolute() and str(path.parent) in (".", "configs"):
        for folder in project:
            if (folder / name).is_file():
                return folder / name
    available = sorted(p.name for folder in project for p in folder.glob("*.py") if p.name != "common.py")
    message = f"config file not found: {text}"
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.8)
    if close:
        message += f"; did you mean {Path(text).with_name(close[0])}?"
    if project:
        message += f" (the project's configs, in {project[0]}: {', '.join(Path(a).stem for a in available)})"
    else:
        message += " (this installation has no configs folder: pass the path of a config file)"
    raise CommandError(message)


def _get_config(path: Path, arg: str | None, spec: str) -> Any:
    module_spec = importlib.util.spec_from_file_location(f"_rwkvunet_config_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise CommandError(f"--config {spec}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - a user's config can fail in any way; say where, in one line
        raise CommandError(f"--config {spec}: could not load {path}: {type(err).__name__}: {err}") from err
    if not callable(getattr(module, "get_config", None)):
        raise CommandError(f"--config {spec}: {path} defines no get_config() function")
    try:
        return module.get_config() if arg is None else module.get_config(arg)
    except (ValueError, KeyError, TypeError) as err:  # the config's own check of its argument (e.g. the size)
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise CommandError(f"--config {spec}: {message}") from err


def field_paths(config: Any, prefix: str = "") -> Iterator[str]:
    """Every leaf field of a ConfigDict as a dotted path (``"optim.lr"``)."""
    from ml_collections import ConfigDict

    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            yield from field_paths(value, f"{path}.")
        else:
            yield path


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """``config`` with ``--config.FIELD=VALUE`` ``overrides`` applied in its fields' types, then locked."""
    from absl import flags
    from ml_collections import config_flags

    from rwkvunet_jax.train.config_fields import renamed_override_message

    known = list(field_paths(config))
    for item in overrides:
        field = item[len(OVERRIDE_PREFIX):].partition("=")[0]
        if field not in known:
            renamed = renamed_override_message([item])  # an older version's name, e.g. optim.base_lr
            if renamed is not None:
                raise CommandError(renamed)
            close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
            raise CommandError(f"no config field {field!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                               " (the config file's docstring lists its fields)"))
    argv = ["rwkvunet", *overrides]
    flag_values = flags.FlagValues()
    try:
        holder = config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, lock_config=True,
                                                 sys_argv=argv)
        flag_values(argv)
    except flags.Error as err:
        # absl says "flag --config.a=b: <why>"; the "flag " adds nothing.
        raise CommandError(f"bad override {str(err).removeprefix('flag ')}") from err
    return holder.value
