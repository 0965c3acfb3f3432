"""What the command-line entry points share: one-line user errors and quiet logs."""
from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any, Callable

from absl import flags, logging
from ml_collections import config_flags

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """The one line a user error prints, then exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def add_config_roots(argv: list[str]) -> None:
    """Puts the directory above ``configs/`` on ``sys.path``, so that a config
    file's ``from configs import common`` works: the config file's own
    repository first (a command run from elsewhere), then the working
    directory."""
    roots = [os.getcwd()]
    for index, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else \
            argv[index + 1] if arg == "--config" and index + 1 < len(argv) else None
        folder = os.path.dirname(os.path.abspath(value.split(":", 1)[0])) if value else ""
        if os.path.basename(folder) == "configs":
            roots.append(os.path.dirname(folder))
    for root in roots:
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, KeyError) and len(error.args) == 1:  # str() quotes its message
        text = str(error.args[0]).strip()  # keeps the message's own quotes
    lines = text.splitlines()
    if not lines:
        return type(error).__name__
    more = " (details: --verbosity=1)" if len(lines) > 1 else ""
    return lines[0].strip() + more


def start(argv) -> None:
    """The opening of every absl ``main``: no stray arguments, and warnings
    only unless --verbosity is given (orbax and tfds log every step at INFO)."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}; every option is a flag such as "
             "--workdir=DIR or --config.lr=1e-3 (see --helpfull)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


# ---------------------------------------------------------------------------
# Flags with an ml_collections config: mistakes as one line, not a traceback
# ---------------------------------------------------------------------------
def flags_parser(config_flag) -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``app.run`` that reports a flag or config-key
    typo, a bad value or a config file that fails to load as one line.
    ``config_flag``: the holder ``DEFINE_config_file`` returned."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.UnrecognizedFlagError as error:
            if not error.flagname.startswith("config."):
                fail(flag_error_message(error))
            fail(unknown_key_message(config_flag, error.flagname.removeprefix("config.")))
        except flags.Error as error:
            fail(flag_error_message(error))
        except (AttributeError, KeyError) as error:  # ml_collections: a key it lacks
            text = str(error.args[0]) if error.args else str(error)
            if "has no attribute 'get_config'" in text:
                fail("--config names a file without get_config() (a helper module?); give an "
                     "experiment config such as configs/default.py")
            bad = (re.search(r"\w+", text) or [text])[0]
            suggested = re.search(r'Did you mean "([^"]+)"', text)
            key, fixed = _given_key(argv, bad, suggested and suggested[1])
            fail(unknown_key_message(config_flag, key, fixed))
    return parse


def config_value(config_flag) -> Any:
    """The loaded config; a file that failed to load is one line."""
    try:
        config = config_flag.value
        getattr(config, "keys")  # one that failed to load raises at its first use
    except OSError as error:  # ml_collections defers a load failure to there
        reason = str(error).strip().splitlines()[-1].strip()  # the OS's own words come last
        fail(f"--config could not be loaded ({reason}); "
             "give a config file such as configs/default.py, with optional :arguments")
    if "runlocal" in config_flags.get_override_values(flags.FLAGS[config_flag.name]):
        # The config file shrinks the run when it loads; the key only records that.
        fail("--config.runlocal does not shrink a run; give it as the config's argument "
             "instead, e.g. --config configs/fashion_mnist.py:runlocal")
    return config


def flag_error_message(error: flags.Error) -> str:
    """The innermost cause: a bad ``key=value`` argument raises inside the
    config file, and absl wraps it in a message that holds a traceback."""
    text = str(error)
    if "Traceback" not in text:
        return f"{text.splitlines()[0].strip()}; fix the value (see --helpfull)"
    return first_line(_innermost_cause(error))


def _innermost_cause(error: BaseException) -> BaseException:
    while True:
        following = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if following is None:
            return error
        error = following


def _given_key(argv: list[str], bad: str, suggested: str | None) -> tuple[str, str | None]:
    """The dotted key ('noise.typo') of the --config.* argument holding the
    unknown name ``bad``, and that key with ml_collections' suggestion."""
    given = [a.split("=")[0].removeprefix("--config.") for a in argv[1:]
             if a.startswith("--config.")]
    key = next((k for k in given if bad in k.split(".")), bad)
    if not suggested:
        return key, None
    parts = key.split(".")
    parts[parts.index(bad) if bad in parts else -1] = suggested
    return key, ".".join(parts)


def unknown_key_message(config_flag, key: str, fixed: str | None = None) -> str:
    """'lrr' -> one line, with the corrected key (ml_collections' suggestion
    or the closest key of the loaded config)."""
    if fixed is None:
        parent, _, leaf = key.rpartition(".")
        closest = _closest_key(config_flag, parent, leaf)
        fixed = f"{parent}.{closest}" if closest and parent else closest
    hint = f"did you mean --config.{fixed}? " if fixed else ""
    return (f"unknown config key --config.{key}; {hint}every key must exist in the config file "
            "(check the spelling)")


def _closest_key(config_flag, parent: str, leaf: str) -> str | None:
    try:
        node = config_flag.value
        for name in filter(None, parent.split(".")):
            node = node[name]
        close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
    except Exception:  # no config loaded yet, or the parent is unknown too
        return None
    return close[0] if close else None
