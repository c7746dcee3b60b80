"""Entry point launched by examples/pretrain_apex_dit.sh through torchrun (or run directly for a
single process). Megatron-style flags; `--help` lists them."""

import sys

from megatron_apex.training.arguments import parse_args
from megatron_apex.training.loop import pretrain


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        pretrain(cfg)
    except (ValueError, FileNotFoundError) as err:
        # Bad flags, configs or checkpoints: one line naming the culprit, not a traceback.
        print(f"pretrain_apex_dit.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


# The guard matters: megatron-core's checkpoint writer starts helper processes that re-import
# __main__.
if __name__ == "__main__":
    sys.exit(main())
