"""Stages with argv, files, accelerate and logging: make_shards -> train_tokenizer -> encode_shards -> train_prior -> sample -> evaluate."""
