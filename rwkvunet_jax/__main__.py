"""``python -m rwkvunet_jax`` is the same as the ``rwkvunet`` command."""

import sys

from rwkvunet_jax.cli import main

sys.exit(main())
