#!/usr/bin/env python3
"""The installed `rmt-prepare-enwik8` command (rmt_data/enwik8.py), runnable from a checkout."""

from rmt_data.enwik8 import cli

if __name__ == "__main__":
    cli()
