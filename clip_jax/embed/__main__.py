"""`python -m clip_jax.embed`: the embedder's command line (`clip_jax.embed.main`)."""
import sys

from clip_jax.embed import main

if __name__ == "__main__":
  sys.exit(main())
