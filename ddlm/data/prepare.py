"""Prepares a corpus (or checks and reuses it) and its tokenizer: one command, also run on first use.

python -m ddlm.data.prepare --corpus=shakespeare --tokenizer=sentencepiece --vocab_size=4096
python -m ddlm.data.prepare --corpus=local:/data/my_texts --tokenizer=char
"""

from absl import app, flags

from ddlm.data import corpora, pipeline, tokenizers

flags.DEFINE_string("corpus", "shakespeare", "'shakespeare' | 'kjv' | 'local:<dir>'")
flags.DEFINE_string("data_dir", "", "cache folder ('' = $DDLM_DATA_DIR or ~/.cache/ddlm)")
flags.DEFINE_string("text_field", "text", "field holding the text in .jsonl lines")
flags.DEFINE_float(
    "validation_fraction",
    pipeline.default_config().validation_fraction,
    "share of documents in the validation split (config.data.validation_fraction; each value is a variant)",
)
flags.DEFINE_string(
    "tokenizer", "", "also prepare this tokenizer: 'char' | 'byte' | 'sentencepiece' | 'gpt2'"
)
flags.DEFINE_integer("vocab_size", 0, "vocab_size (incl. specials and mask) for sentencepiece")


def main(argv):
    del argv
    f = flags.FLAGS
    config = pipeline.default_config()
    config.corpus, config.data_dir, config.text_field = f.corpus, f.data_dir, f.text_field
    config.validation_fraction = f.validation_fraction
    prepared = corpora.prepare_corpus(config)
    print(f"{config.corpus}: {'reused' if prepared.reused else 'prepared'} {prepared.version_dir}")
    for split, stats in prepared.manifest["splits"].items():
        print(f"  {split}: {stats['documents']} documents, {stats['bytes']:,} bytes")
    print(f"  skipped: {prepared.manifest['skipped']}")
    if f.tokenizer:
        config.tokenizer, config.vocab_size = f.tokenizer, f.vocab_size
        print(f"  tokenizer: {tokenizers.get_tokenizer(config)!r}")


if __name__ == "__main__":
    app.run(main)
