"""Data preparation for rmt-fairseq, installed with the package as commands.

``rmt-prepare-enwik8`` (:mod:`rmt_data.enwik8`) and ``rmt-prepare-wikitext``
(:mod:`rmt_data.wikitext`) write ``fairseq-preprocess`` data-bins; :mod:`rmt_data.byte_level` is
the byte-level ("enwik8") format both use, :mod:`rmt_data.common` their shared plumbing. A sibling
of ``rmt_plugin`` rather than inside it, so that ``--help`` and an up-to-date rerun do not pay for
importing fairseq and registering the model.
"""
