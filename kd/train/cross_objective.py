"""The cross-tokenizer objective: teacher and student with different tokenizers (kd.cross_tokenizer, issue 30).

    objective = CrossTokenizerObjective(cfg, student, teacher, pair, autocast=False, device="cpu")
    out = objective(batch, normalizer=n_tokens)     # kd.train.losses.KDLossOutput (.tokens = groups counted)

Same protocol as kd/train/objectives.py's objectives (make_objective picks this one for the check_vocab verdict
`cross-tokenizer`). Per micro-batch of student token blocks:
1. each block row is cut into document pieces and each piece's text is what its student tokens spell
   (kd/cross_tokenizer/blocks.py); the teacher's tokenizer tokenizes that text and align.py groups the two
   sides' tokens by bytes (TRL GOLD's rule). A batch from the prepared set reads its rows' pieces from the
   groups stored beside it (`groups`, kd/cross_tokenizer/stored.py, memory-mapped, built at prepare time);
   a batch without stored rows (bare ids, generated) is aligned on the fly.
2. the student runs on the block as usual; the teacher on its tokens of each row's pieces, packed into one
   sequence with position ids restarting per piece (block-diagonal attention, as for the prepared set).
3. a piece's first group is not trained (its first tokens have no prediction on the teacher side: the teacher
   sees only the piece); every later group g is predicted from the position before its first token on each
   side. A group counts when all its student tokens are trained (labels != -100). Chat data: each trained
   assistant turn end adds the end-of-turn binary KL (losses.py, `kd.cross_tokenizer.end_of_turn`).
4. kd/cross_tokenizer/losses.py's chunked loss (cfg.kd.cross_tokenizer.kind: uld | hybrid | projection) with
   alpha, temperature from cfg.kd; the vocabulary map or projection is built once, here.

Normalization (kd/train/loss_normalization.py): with `normalizer` (the loops pass the step's trained *student
tokens*, labels != -100) the CE sum over the counted groups' student tokens and the divergence sum over the
counted groups are both divided by it, so one global batch gives one gradient however it is split, and with
the same tokenizer on both sides (one group per token) the loss is the same-vocabulary objective's. Without a
normalizer: CE mean over counted student tokens, divergence mean over counted groups and turn ends. Tokens this objective
does not train (each piece's first group, special tokens such as eos, the bytes of a character cut by a block
edge) are still in the normalizer's count: it is the step's count, shared with the same-vocabulary path.
"""

from __future__ import annotations

import torch

from backends import get_backend
from kd.config import RunConfig
from kd.cross_tokenizer.align import TokenizerPair
from kd.cross_tokenizer.blocks import BatchPlan, plan_batch
from kd.cross_tokenizer.losses import Side, cross_tokenizer_kd_loss
from kd.cross_tokenizer.report import special_ids
from kd.cross_tokenizer.stored import stored_rows
from kd.cross_tokenizer.vocab_map import build_projection, exact_matches
from kd.data import IGNORE, Batch
from kd.train.losses import KDLossOutput


class CrossTokenizerObjective:
    """Student + frozen teacher with another tokenizer -> the cross-tokenizer KD loss on one batch."""

    def __init__(self, cfg: RunConfig, student, teacher, pair: TokenizerPair, *, autocast: bool, device: str,
                 groups: dict | None = None):
        self.cfg, self.student, self.teacher, self.pair, self.groups = cfg, student, teacher, pair, groups or {}
        self.autocast, self.device = autocast, device
        self.backend = get_backend("hf")
        ct = cfg.kd.cross_tokenizer
        self.specials = special_ids(pair.student)
        self.vs, self.vt = len(pair.student_bytes), len(pair.teacher_bytes)
        self.vocab_map = exact_matches(pair.teacher_bytes, pair.student_bytes) if ct.kind == "hybrid" else None
        self.projection = build_projection(pair) if ct.kind == "projection" else None

    def plan(self, batch: Batch) -> BatchPlan:
        """The batch's alignment (kd/cross_tokenizer/blocks.py's plan_batch), from the stored groups when the batch
        names its split's rows."""
        pos = None if batch.position_ids is None else batch.position_ids.cpu().numpy()
        return plan_batch(self.pair, batch.ids.cpu().numpy(), pos, batch.labels.cpu().numpy(), self.specials, IGNORE,
                          segments=stored_rows(self.groups, batch))

    def teacher_hidden(self, t_seqs, t_pos) -> torch.Tensor:
        """The teacher's final hidden states over each row's packed pieces, concatenated (M, H)."""
        out = []
        for seq, p in zip(t_seqs, t_pos):
            if len(seq) == 0:
                continue
            x = torch.as_tensor(seq, device=self.device).unsqueeze(0)
            pp = torch.as_tensor(p, device=self.device).unsqueeze(0)
            out.append(self.backend.hidden_states(self.teacher, x, position_ids=pp)[0])
        return torch.cat(out) if out else None

    def __call__(self, batch: Batch | torch.Tensor, normalizer: float | None = None) -> KDLossOutput:
        """KD loss of `batch` over byte-aligned groups (module docstring for the normalization)."""
        kd, ct = self.cfg.kd, self.cfg.kd.cross_tokenizer
        if not isinstance(batch, Batch):  # bare (B, L) ids: every next token is a label
            batch = Batch(batch, batch[:, 1:], None)
        p = self.plan(batch)
        s_rows, s_ids, sb, t_seqs, t_pos, t_rows, t_ids, tb, keep = (p.s_rows, p.s_ids, p.sb, p.t_seqs, p.t_pos,
                                                                     p.t_rows, p.t_ids, p.tb, p.keep)
        ids = batch.ids.to(self.device)
        pos = None if batch.position_ids is None else batch.position_ids.to(self.device)
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.autocast):
            s_hidden = self.backend.hidden_states(self.student, ids, position_ids=pos)
            with torch.no_grad():
                t_hidden = self.teacher_hidden(t_seqs, t_pos)
        s_w, s_b = self.backend.output_head(self.student)
        t_w, t_b = self.backend.output_head(self.teacher)
        dev = s_hidden.device
        h = s_hidden.reshape(-1, s_hidden.shape[-1]).index_select(0, torch.as_tensor(s_rows, device=dev))
        th = (t_hidden.index_select(0, torch.as_tensor(t_rows, device=dev)) if t_hidden is not None
              else s_hidden.new_zeros(0, t_w.shape[1]))
        student = Side(h, s_w[: self.vs], torch.as_tensor(s_ids, device=dev), torch.as_tensor(sb, device=dev),
                       None if s_b is None else s_b[: self.vs])
        teacher = Side(th.detach(), t_w[: self.vt].detach(), torch.as_tensor(t_ids, device=dev),
                       torch.as_tensor(tb, device=dev), None if t_b is None else t_b[: self.vt].detach())
        return cross_tokenizer_kd_loss(student, teacher, ct, alpha=kd.alpha, temperature=kd.temperature,
                                       vocab_map=self.vocab_map, projection=self.projection,
                                       group_mask=torch.as_tensor(keep, device=dev), normalizer=normalizer,
                                       end_of_turn=(torch.as_tensor(p.eot_s, device=dev),
                                                    torch.as_tensor(p.eot_t, device=dev)))
