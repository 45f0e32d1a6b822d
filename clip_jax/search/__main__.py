"""`python -m clip_jax.search`: the index builder and the server (`clip_jax.search.main`)."""
import sys

from clip_jax.search import main

if __name__ == "__main__":
  sys.exit(main())
