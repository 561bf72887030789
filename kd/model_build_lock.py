"""One transformers model build at a time per process.

transformers 5 builds a model (`from_pretrained`, `from_config`) by swapping process-wide state and
restoring it afterwards: `PreTrainedModel.tie_weights` becomes a no-op, torch's default dtype changes,
torch.nn.init functions are patched, and its lazy imports fill module globals. Builds in two threads
(a sweep's concurrent trials are threads of one process) interleave those swaps: a tied output head is
left untied and random (strict loading then refuses the checkpoint) and the no-op `tie_weights` can stay
installed for the rest of the process. Every kdflow call that builds a transformers model holds this lock.
"""

from __future__ import annotations

import threading

# re-entrant: a failed load reports shape mismatches by building the model again (backends.hf)
MODEL_BUILD_LOCK = threading.RLock()
