#!/usr/bin/env python3
"""The installed `rmt-prepare-wikitext` command (rmt_data/wikitext.py), runnable from a checkout."""

from rmt_data.wikitext import cli

if __name__ == "__main__":
    cli()
