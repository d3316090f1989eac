"""What shardmerge knows about model architectures: layer kinds, expert layouts, embeddings.

Facts about how transformers' models name and store their tensors, needed by
the adapter translators, the planner and the codecs alike; this package
imports only io/, errors and terms, so each of them may import it (and
transformers, lazily and only when installed, for its checkpoint conversion
rules: rules.py).
"""
