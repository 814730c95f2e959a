"""Data pipeline: sources -> SentencePiece tokenizer -> token shards -> packed, resumable batches.

* :mod:`data.sources`   source schema (`configs/data/*.yaml`) and loading documents.
* :mod:`data.tokenizer` `Tokenizer.load(path)`, `train_tokenizer(...)`; CLI `python -m data.tokenizer`.
* :mod:`data.shards`    the shard file format (header, tokens, document index) with validation.
* :mod:`data.prepare`   `prepare(data_cfg, tok_cfg) -> out_dir`; CLI `python -m data.prepare data=... tokenizer=...`.
* :mod:`data.loader`    `PackedLoader(out_dir, seq_len=..., micro_batch_size=...)`.
* :mod:`data.synthetic` passkey / needle / MQAR documents for training mixtures and evaluation.

Typical use (what `make demo` does)::

    out = prepare(cfg.data, cfg.tokenizer)          # idempotent; trains the tokenizer if missing
    loader = PackedLoader(out, seq_len=1024, micro_batch_size=8, rank=rank, world_size=world)
    tok = Tokenizer.load(loader.tokenizer_path)     # the copy stored next to the shards
"""
