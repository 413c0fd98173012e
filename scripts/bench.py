"""GRU benchmark vs torch.nn.GRU and Flax linen, one run, JSON out.

  python scripts/bench.py --json bench.json [--repeats 5] [--quick]
"""

import sys

from gru_tpu.bench import main

if __name__ == "__main__":
  sys.exit(main())
