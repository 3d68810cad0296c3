"""The ``stresnet`` command: one subcommand per job, each taking ``--config FILE [key=value ...]``.

Subcommands live in their own modules and are imported only when called, so ``stresnet shards``
does not pay for importing Ray and MLflow. Each module exposes ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("cluster.shards", "videos -> RGB frames + optical flow -> WebDataset shards"),
    "train": ("cluster.train", "train on Ray Train, tracked in MLflow"),
    "evaluate": ("cluster.evaluate", "video-level accuracy report of a checkpoint or MLflow model"),
    "predict": ("cluster.predict", "top-k classes of a trained model for video files"),
    "main-job": ("cluster.main_job", "synthetic data -> shards -> training -> evaluation, locally"),
}


def usage() -> str:
    lines = ["usage: stresnet COMMAND --config FILE [key.sub=value ...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"stresnet: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
