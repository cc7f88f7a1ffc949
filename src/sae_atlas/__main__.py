"""``python -m sae_atlas`` is the ``sae-atlas`` command."""

from sae_atlas.cli import app

app(prog_name="sae-atlas")
