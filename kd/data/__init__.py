"""Data: sources -> a prepared (tokenised, split by document, packed, memory-mapped) set -> batches.

    result = prepare_data(cfg.data, student_dir, max_positions=2048)    # the prepare_data DAG step
    ps = open_prepared(result.path)                                     # training / eval
    batch = train_batch(ps.train, step=3, micro=0, batch_size=8, grad_accum=1, seed=0)
    batch.ids, batch.labels (-100 = no loss), batch.position_ids (restart per document)

Formats (`data.format`): text (EOS after each document), chat (`data.messages_field`, rendered with
the student's chat template, loss on assistant turns per `data.train_on`), prompt_completion (loss
on the completion). Sources: `smoke`, `bundled:NAME` (kd/corpus/NAME), a .txt/.jsonl/.parquet/.arrow file or folder, or
`hf-dataset:owner/name`. Modules: sources (files, tokenizer facts), encode (records -> ids + loss
mask), prepare (the step), prepared (on-disk layout, reading, batches).
"""

from kd.data.encode import RecordEncoder, chat_template_of
from kd.data.prepare import fingerprint, pack_dataset, prepare_data, prepared_base, sample_blocks
from kd.data.prepared import IGNORE, Batch, PreparedSet, Split, batch_rows, open_prepared, train_batch
from kd.data.sources import (SMOKE_CORPUS, data_fingerprint, detect_format, eos_id, load_tokenizer,
                             model_max_positions, source_files, tokenizer_fingerprint)

PackedData = PreparedSet  # the old name: what pack_dataset returns

__all__ = ["Batch", "IGNORE", "PackedData", "PreparedSet", "RecordEncoder", "SMOKE_CORPUS", "Split", "batch_rows",
           "chat_template_of", "data_fingerprint", "detect_format", "eos_id", "fingerprint", "load_tokenizer",
           "model_max_positions", "open_prepared", "pack_dataset", "prepare_data", "prepared_base", "sample_blocks",
           "source_files", "tokenizer_fingerprint", "train_batch"]
