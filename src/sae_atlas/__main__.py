"""``python -m sae_atlas`` is the ``sae-atlas`` command."""

from sae_atlas.cli import app

# Guarded: worker processes (spawned, see sae_atlas.engine) import this module as __mp_main__.
if __name__ == "__main__":
    app(prog_name="sae-atlas")
