"""The `growlm` command line: one subcommand per typed function (jsonargparse).

Each command group lives in a module of `growlm.cli`; this module only dispatches and turns user errors
(`GrowlmError`, missing files, bad configs) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable
from growlm.cli import distill as cmd_distill
from growlm.cli import eval as cmd_eval
from growlm.cli import export as cmd_export
from growlm.cli import grow as cmd_grow
from growlm.cli import model as cmd_model
from growlm.cli import plan as cmd_plan
from growlm.cli import prune as cmd_prune
from growlm.cli import report as cmd_report
from growlm.cli import train as cmd_train
from growlm.errors import GrowlmError


def _commands() -> dict[str, Callable]:

    return {
        "info": cmd_model.info,
        "convert": cmd_model.convert,
        "generate": cmd_model.generate,
        "perplexity": cmd_model.perplexity,
        "demo": cmd_model.demo,
        "tokenizer": cmd_model.tokenizer,
        "grow": cmd_grow.grow,
        "prune": cmd_prune.prune,
        "eval": cmd_eval.eval,
        "train": cmd_train.train,
        "distill": cmd_distill.distill,
        "report": cmd_report.report,
        "export": cmd_export.export,
        "plan": cmd_plan.plan,
    }


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jsonargparse import ArgumentParser, CLI  # noqa: F401


    argv = cmd_export.positional_run(cmd_report.positional_runs([_underscore_option(a) for a in (sys.argv[1:] if argv is None else argv)]))
    try:
        from jsonargparse import auto_cli
    except ImportError:  # older jsonargparse
        from jsonargparse import CLI as auto_cli
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # shown after a success, dropped with a refusal
            _quiet_libraries()
            _help_from_docstrings()
            auto_cli(_commands(), args=argv, as_positional=False, parser_class=_parser_class(),
                     description="growlm: grow, distil and continue pretraining small GPT-style models")
    except GrowlmError as e:
        print(f"growlm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # missing files, permissions, read-only or full file systems
        where = f": {e.filename}" if e.filename else ""
        print(f"growlm: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command may say what it kept and how to continue
        print(f"growlm: {e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse errors exit 2 after printing one usage error line
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return 0


def _parser_class():
    """jsonargparse's parser, but a bad option or config key prints one line (plus a hint), not the usage."""
    from jsonargparse import ArgumentParser

    class Parser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
            sub = self.prog.replace(" [options]", "").split(" ", 1)[1:]  # prog is '<argv0> [options] SUB'
            hint = " ".join(["growlm", *sub, "--help"])
            print(f"growlm: error: {' '.join(lines)[:2000]} (see '{hint}')", file=sys.stderr)
            raise SystemExit(2)

    return Parser


def _help_from_docstrings() -> None:
    """Help texts from the dataclass fields' attribute docstrings and the functions' Args (docstring-parser)."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)


def _underscore_option(arg: str) -> str:
    """Accept `--data-dir` as well as `--data_dir` (option names are the functions' argument names)."""
    if not arg.startswith("--") or len(arg) < 4:
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def entry() -> None:
    sys.exit(main())

