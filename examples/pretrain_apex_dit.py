"""Entry point launched by examples/pretrain_apex_dit.sh through torchrun (or run directly for a
single process). Megatron-style flags; `--help` lists them."""

import os
import sys

from megatron_apex.training.arguments import parse_args
from megatron_apex.training.dry_run import dry_run, split_dry_run_flags
from megatron_apex.training.loop import pretrain
from megatron_apex.training.run_control import DivergedError


def main(argv=None) -> int:
    try:
        dry, flags = split_dry_run_flags(sys.argv[1:] if argv is None else argv)
        if dry is not None:
            world = int(os.environ.get("WORLD_SIZE", 0)) or (int(os.environ.get("NNODES", 1))
                                                             * int(os.environ.get("NPROC_PER_NODE", 1)))
            print(dry_run(dry, flags, world), flush=True)
            return 0
        cfg = parse_args(flags)
        pretrain(cfg)
    except (ValueError, FileNotFoundError) as err:
        # Bad flags, configs or checkpoints: one line naming the culprit, not a traceback.
        print(f"pretrain_apex_dit.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    except DivergedError as err:
        print(f"pretrain_apex_dit.py: error: {err}", file=sys.stderr, flush=True)
        return 3
    return 0


# The guard matters: megatron-core's checkpoint writer starts helper processes that re-import
# __main__.
if __name__ == "__main__":
    sys.exit(main())
