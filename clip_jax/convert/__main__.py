"""`python -m clip_jax.convert`: the converter's command line (`clip_jax.convert.main`)."""
import sys

from clip_jax.convert import main

if __name__ == "__main__":
  sys.exit(main())
