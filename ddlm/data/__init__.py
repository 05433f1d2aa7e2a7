"""Text corpora (tfds builder, cache), tokenizers and the grain input pipeline.

tok = ddlm.data.tokenizers.get_tokenizer(config.data)
it = ddlm.data.pipeline.make_iterator(config.data, tok, 'train', global_batch_size=..., seq_len=...)
"""

from ddlm.data import corpora, pipeline, sources, tokenizers  # noqa: F401
