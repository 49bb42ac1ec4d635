"""What the commands share: the help formatter, the flag groups a command picks from, and the
settings and task service built from them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from allinone.settings import (
    EngineSettings,
    ModelSettings,
    ServerSettings,
    Settings,
    SpeechSettings,
)
from allinone.settings_flags import add_settings_flags, settings_from_flags


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help, from the parser itself (never retyped), except
    where there is nothing to say: no default (None), an off switch, an empty list."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == []:
            return action.help
        return super()._get_help_string(action)


@dataclass(frozen=True)
class FlagGroups:
    """Parent parsers, one per group of flags; a command names the groups it uses."""

    verbose: argparse.ArgumentParser
    tasks_dir: argparse.ArgumentParser
    model: argparse.ArgumentParser
    engine: argparse.ArgumentParser
    server: argparse.ArgumentParser
    speech: argparse.ArgumentParser
    replicas: argparse.ArgumentParser

    @classmethod
    def build(cls) -> FlagGroups:
        """Fresh parents (argparse copies their actions into each command)."""

        def parent() -> argparse.ArgumentParser:
            return argparse.ArgumentParser(add_help=False)

        verbose = parent()
        verbose.add_argument("-v", "--verbose", action="store_true", help="log more")
        tasks_dir = parent()
        tasks_dir.add_argument(
            "--tasks-dir",
            action="append",
            type=Path,
            default=[],
            help="folder of extra task files (*.toml); may repeat (env ALLINONE_TASKS_DIR)",
        )
        groups = {}
        for name, settings in (
            ("model", ModelSettings),
            ("engine", EngineSettings),
            ("server", ServerSettings),
            ("speech", SpeechSettings),
        ):
            groups[name] = parent()
            add_settings_flags(groups[name], settings)
        replicas = parent()  # Ray Serve: `serve --ray` and `deploy ray`
        replicas.add_argument("--min-replicas", type=int, default=1, help="Ray Serve: fewest")
        replicas.add_argument("--max-replicas", type=int, default=2, help="Ray Serve: most")
        return cls(verbose=verbose, tasks_dir=tasks_dir, replicas=replicas, **groups)

    @property
    def llm(self) -> list[argparse.ArgumentParser]:
        """What a command that loads the model in this process takes."""
        return [self.verbose, self.tasks_dir, self.model, self.engine]


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """A subcommand that runs ``func(args)``, with the flags of ``parents`` and defaults in its
    help."""
    p = sub.add_parser(
        name, parents=list(parents), help=help, description=help, formatter_class=HelpFormatter
    )
    p.set_defaults(func=func)
    return p


def load_settings(args: argparse.Namespace) -> Settings:
    """Flags override env/.env, which override defaults (flags: allinone.settings_flags). A
    command without a group's flags gets that group from env/.env/defaults."""
    return Settings(
        model=settings_from_flags(args, ModelSettings),
        engine=settings_from_flags(args, EngineSettings),
        server=settings_from_flags(
            args, ServerSettings, tasks_dir=getattr(args, "tasks_dir", None) or None
        ),
        speech=settings_from_flags(args, SpeechSettings),
    )


def open_service(settings: Settings, use_calibration: bool = True):
    """The task service over a loaded backend; the caller closes ``service.backend``."""
    from allinone.runtime import decision_strategy_for, make_backend
    from allinone.service import TaskService
    from allinone.tasks import TaskRegistry

    tasks = TaskRegistry.load(settings.server.tasks_dir)
    backend = make_backend(settings)
    backend.load()
    service = TaskService(
        backend, tasks, settings.server.default_max_tokens, decision_strategy_for(settings)
    )
    if use_calibration:
        service.load_calibrations(settings.model.cache_dir)
    return service
