"""jaxscale data: corpora, cleaning, tokenizers and grain loaders.

Documents of your own in a script (dicts with a "text" field, e.g. `data.synthetic.documents(n)`) reach
`data.loader.LMLoader` as a tier directory of ArrayRecord shards, the form the cleaning pipeline writes:

    from data.shards import DocWriter, shard_name
    from data.loader import LMLoader, LoaderConfig, Source
    from data.tokenizer import ByteTokenizer

    w = DocWriter(f"{tier}/{shard_name(0)}.array_record")
    for doc in docs:
        w.write(doc)
    w.commit()
    loader = LMLoader([Source(tier)], ByteTokenizer(add_eos=True), LoaderConfig(seq_len=T, global_batch_size=B),
                      mesh=mesh)  # next(loader): [B, T] inputs, targets, positions, segment_ids, weights on the mesh

The byte tokenizer with EOS has 257 ids: a model's vocab_size must cover them and, sharded over `tensor`, divide
by it (the demo and tiny presets use 320).
"""
