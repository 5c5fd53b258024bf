"""rmt-fairseq: the Recurrent Memory Transformer for fairseq (``--user-dir rmt_plugin``)."""
