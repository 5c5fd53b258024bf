"""The Python API on a checkpoint (docs/python_api.md): score a long text, look at the memory,
continue the stream.

    python examples/stream_api.py checkpoints/wt2/checkpoint_best.pt
"""

import sys

from rmt_plugin.api import bits, load

lm = load(sys.argv[1])  # no `import rmt_plugin` needed first
text = "the game was released in 2010 . it received positive reviews from critics ."
log_probs = lm.score(lm.encode(text))  # one stream, read segment by segment, memory carried
print(f"{bits(log_probs):.3f} bits per token over {log_probs.size(1)} tokens")
if lm.memory is not None:
    print(f"memory now: {tuple(lm.memory.shape)}, norm {lm.memory.norm(dim=-1).mean():.2f}")
continuation = lm.generate(12)  # greedy, the same stream
print("continued:", lm.dictionary.string(continuation[0]))
lm.reset()  # a fresh stream: the learned start memory, no cache
print(f"the same text from fresh memory again: {bits(lm.score(lm.encode(text))):.3f} bits per token")
