"""``python -m sae_shards.cli``: the ``sae-shards`` command, as a multi-process launcher starts
it (``accelerate launch ... -m sae_shards.cli train``)."""

import sys

from sae_shards.cli import main

sys.exit(main())
