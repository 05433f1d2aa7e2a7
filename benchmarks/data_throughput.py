r"""Tokens per second of the data pipeline, per tokenizer, with 0 and 2 grain worker processes.

    python benchmarks/data_throughput.py --corpus=shakespeare --seq_len=512 --global_batch_size=16

For each tokenizer the pipeline (read tfds array_record -> shuffle -> tokenize -> wrap-pack -> batch)
is warmed up (worker start-up and the first batch are not timed) and then drained for
``--seconds``; tokens/s counts the tokens of the batches delivered. Compare with the train step's
consumption: global_batch_size * seq_len / step time.
"""

import time

from absl import app, flags

from ddlm.data import pipeline, tokenizers

FLAGS = flags.FLAGS
flags.DEFINE_string("corpus", "shakespeare", "'shakespeare' | 'kjv' | 'local:<dir>' | tfds name")
flags.DEFINE_string("data_dir", "", "cache folder ('' = $DDLM_DATA_DIR or ~/.cache/ddlm)")
flags.DEFINE_list("tokenizers", ["char", "byte", "sentencepiece", "gpt2"], "tokenizers to measure")
flags.DEFINE_list("workers", ["0", "2"], "numbers of grain worker processes to measure")
flags.DEFINE_integer("spm_vocab_size", 4096, "vocab_size of the SentencePiece tokenizer")
flags.DEFINE_integer("seq_len", 512, "tokens per sequence")
flags.DEFINE_integer("global_batch_size", 16, "sequences per batch")
flags.DEFINE_float("seconds", 5.0, "timed duration per measurement")
flags.DEFINE_string("packing", "wrap", "'wrap' | 'pad'")


def measure(config, tok, seconds: float) -> tuple[float, int]:
    """Returns (tokens per second, batches timed) of a fresh training iterator."""
    it = pipeline.make_iterator(
        config, tok, "train", global_batch_size=FLAGS.global_batch_size, seq_len=FLAGS.seq_len, seed=0
    )
    next(it)  # warm-up: worker start-up, first documents
    n_tokens = n_batches = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        n_tokens += next(it)["tokens"].size
        n_batches += 1
    rate = n_tokens / (time.perf_counter() - start)
    it.close()
    return rate, n_batches


def main(argv):
    del argv
    rows = []
    for kind in FLAGS.tokenizers:
        config = pipeline.default_config()
        config.corpus, config.tokenizer, config.packing = FLAGS.corpus, kind, FLAGS.packing
        config.data_dir = FLAGS.data_dir
        config.vocab_size = FLAGS.spm_vocab_size if kind == "sentencepiece" else 0
        tok = tokenizers.get_tokenizer(config)
        for workers in map(int, FLAGS.workers):
            config.num_workers = workers
            rate, n = measure(config, tok, FLAGS.seconds)
            rows.append((kind, tok.vocab_size, workers, rate, n))
            print(
                f"{kind:>13s}  vocab {tok.vocab_size:>6d}  workers {workers}  "
                f"{rate:>12,.0f} tokens/s  ({n} batches)",
                flush=True,
            )
    print(
        f"\n| tokenizer | vocab | workers | tokens/s |  (corpus {FLAGS.corpus}, seq_len {FLAGS.seq_len}, "
        f"batch {FLAGS.global_batch_size}, {FLAGS.packing})"
    )
    print("|---|---|---|---|")
    for kind, vocab, workers, rate, _ in rows:
        print(f"| {kind} | {vocab} | {workers} | {rate:,.0f} |")


if __name__ == "__main__":
    app.run(main)
