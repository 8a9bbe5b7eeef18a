"""``whale-dist <command> [--config FILE] [key=value ...]``: one entry point per job, the same ``main(argv)`` that
``jobs/*.py`` call under ``ray job submit``.

Configuration and input errors end the command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from whale_dist.config import Config, config_to_dict
from whale_dist.errors import USER_ERRORS
from whale_dist.storage import redact

MODEL_AT = ("train.run_name", "train.storage_path")  # where the model is when embed.model is unset
# command -> (module with main(argv), one-line help, the config sections or keys it reads besides ``root``)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "synth": ("whale_dist.synth.job", "write a synthetic survey (Happywhale layout) locally or to s3://", ("synth",)),
    "train": ("whale_dist.train.job", "train the embedding model on Ray Train",
              ("catalogue", "model", "loss", "train")),
    "embed": ("whale_dist.embed.job", "embed new survey photos with Ray Data into parquet shards",
              ("embed", *MODEL_AT)),
    "index": ("whale_dist.index.job", "build and publish a sharded faiss index from embedding shards",
              ("embed.out", "index")),
    "calibrate": ("whale_dist.identify.calibrate",
                  "choose new_individual thresholds (catalogue photos as queries, some animals held out)",
                  ("catalogue", "embed.out", "index", "identify")),
    "identify": ("whale_dist.identify.job", "rank the top-5 individuals (or new_individual) for new photos",
                 ("embed", *MODEL_AT, "index", "identify")),
    "evaluate": ("whale_dist.identify.evaluate", "MAP@5 / top-1 / top-5 of predictions against labels, with baselines",
                 ("catalogue", "index", "identify")),
    "baselines": ("whale_dist.identify.baselines", "random and raw-pixel MAP@5 on a survey's test split", ("synth",)),
    "nightly": ("whale_dist.nightly", "embed a survey night's new photos, propose matches, write its review folder",
                ("embed", *MODEL_AT, "index", "identify", "nightly")),
    "review": ("whale_dist.review.job", "apply a filled-in decisions.csv: catalogue version N+1, index refreshed",
               ("catalogue", "embed.out", "index", "nightly")),
    "stats": ("whale_dist.stats", "what is in a catalogue: counts, species, plots, label problems -> stats.html",
              ("catalogue", "stats")),
    "demo": ("whale_dist.demo", "run the whole pipeline on a synthetic survey on a loopback S3 server",
             ("catalogue", "synth", "model", "loss", "train", "embed", "index", "identify")),
}


def run_job(job: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run ``job(argv)``; a user error becomes one line on stderr and exit status 2."""
    try:
        return int(job(argv) or 0)
    except USER_ERRORS as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"whale-dist: error: {redact(message)}", file=sys.stderr)
        return 2


def usage() -> str:
    lines = ["usage: whale-dist <command> [--config FILE] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text, _) in COMMANDS.items()]
    lines += ["", "Each command reads one YAML config (see configs/) and key=value overrides, e.g. train.epochs=3.",
              "`whale-dist <command> --help` lists the command's flags and the config keys it reads."]
    return "\n".join(lines)


def command_help(command: str) -> str:
    """The command's flags and every config key it reads, with its default: read from the code, so never stale."""
    module_name, help_text, sections = COMMANDS[command]
    flags = getattr(importlib.import_module(module_name), "FLAGS", {})
    lines = [f"usage: whale-dist {command} [--config FILE] [FLAG VALUE ...] [key=value ...]", "", help_text, "",
             "flags:", "  --config FILE".ljust(28) + "one YAML file with any of the keys below (see configs/)"]
    lines += [f"  {flag} VALUE".ljust(28) + f"sets {key}" for flag, key in flags.items()]
    defaults = config_to_dict(Config())
    lines += ["", "config keys read (default; set in the YAML or as key=value):", f"  root = {defaults['root']!r}"]
    for entry in sections:
        section, _, only = entry.partition(".")
        lines += [f"  {section}.{key} = {value!r}" for key, value in defaults[section].items() if only in ("", key)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"whale-dist: error: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(command_help(command))
        return 0
    module = importlib.import_module(COMMANDS[command][0])
    entry = getattr(module, f"{command}_main", None) or module.main
    return run_job(entry, rest)


if __name__ == "__main__":
    sys.exit(main())
