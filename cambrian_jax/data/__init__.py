"""The data path: LLaVA-format JSONL + images → ArrayRecord shards → fixed-shape training batches.

templates   conversation templates, tokenisation with the image sentinel, label masking
tokenizer   loading a local tokenizer.json; tiny byte-level BPE tokenizers for tests
records     cleaning/validating one LLaVA sample and the record format of the shards
prepare     JSONL + images → ArrayRecord shards (python -m cambrian_jax.data.prepare)
pipeline    grain pipeline → batches (make_dataset)
synthetic   a procedurally drawn, CV-Bench-style dataset a tiny model learns on CPU
curate      per-source caps, category rebalancing, response-format prompts (python -m cambrian_jax.data.curate)
"""
