"""The data fields (``config.data``): which corpus, tokenizer and packing a run reads.

``ddlm.data.pipeline.default_config`` is this function (re-exported there); the modules below the pipeline
(tokenizers, sft) import it from here, so no data module imports the pipeline that calls it.
"""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """The data fields; experiments copy this into ``config.data`` and override fields."""
    c = ml_collections.ConfigDict()
    c.corpus = "shakespeare"  # 'shakespeare' | 'kjv' | 'local:<dir>' | a prepared tfds name (lm1b, ...)
    c.data_dir = ""  # cache / tfds folder; '' = $DDLM_DATA_DIR or ~/.cache/ddlm
    c.text_field = "text"  # field holding the text in .jsonl lines and external tfds records
    c.validation_fraction = 0.05  # share of documents (by hash of their key) in our validation split
    c.train_split = "train"  # dataset split read for split='train' (tfds slicing allowed: 'train[:90%]')
    c.eval_split = "validation"  # dataset split read for split='validation' (lm1b: 'test')
    c.tokenizer = "char"  # 'char' | 'byte' | 'sentencepiece' | 'gpt2' | 'wordpiece' (BERT vocab.txt) | 'hf'
    c.tokenizer_path = ""  # explicit file ('' = next to the corpus; wordpiece: vocab.txt; hf: tokenizer.json)
    c.vocab_size = 0  # ids incl. specials and mask; 0 = tokenizer's; sentencepiece: size to train
    c.spm_model_type = "bpe"  # SentencePiece model: 'bpe' | 'unigram'
    c.packing = "wrap"  # 'wrap' (concatenate bos doc eos and cut) | 'pad' (one doc per sequence)
    c.num_workers = 0  # grain worker processes for reading + tokenising (0 = in-process)
    c.worker_buffer_size = 4  # documents prefetched per worker
    c.shuffle_seed = 0  # document order seed when make_iterator gets no seed
    # True: process p of P reads documents [p::P] and packs its own rows (host work does not grow with P).
    # False: every process reads the one stream a single process would and keeps its rows of each global
    # batch: the batches do not depend on the process count (a run on 2 hosts equals one on 1 host, and
    # resumes on any count), for P times the reading and tokenising per host.
    c.shard_by_process = True  # see above
    c.sft_data = ""  # SFT records (ddlm.data.sft): a .jsonl | a folder | 'shakespeare_replies'; '' = text
    c.sft_template = "chat"  # SFT prompt template: 'chat' (plain-text role markers) | 'none'
    return c
