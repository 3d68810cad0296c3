"""``stresnet shards``: the command line of ``pipelines.shards`` (arguments and exit status).

It lives in ``cluster`` because reading a config file (``cluster.config``) is the launcher's job;
the work itself is ``pipelines.shards.make_shards`` and ``finalize``.
"""

from __future__ import annotations

import argparse
import sys

from cluster.config import add_config_arguments, config_from_args
from pipelines.shards import DatasetError, ShardFailures, ShardsError, finalize, make_shards
from stresnet.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    """``stresnet shards --config FILE [--finalize] [key=value ...]``.

    Exit status: 0 done (or nothing to do), 1 some videos failed (everything else written),
    2 nothing could be done (bad config, dataset problems, incomplete partitions, other settings).
    """
    parser = argparse.ArgumentParser(
        prog="stresnet shards", description="videos -> RGB frames + optical flow -> WebDataset shards"
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--finalize", action="store_true",
        help="only write manifest.json from the completed partitions",
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.finalize:
            finalize(cfg)
        else:
            make_shards(cfg)
    except ShardFailures as err:
        print(f"stresnet shards: {err}\n(set shards.allow_failures=true to accept this)", file=sys.stderr)
        return 1
    except (ConfigError, DatasetError, ShardsError, FileExistsError) as err:
        print(f"stresnet shards: {err}", file=sys.stderr)
        return 2
    return 0
