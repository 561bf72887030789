"""The prepared set's stored groups (kd/cross_tokenizer/stored.py, issue 30 item 2): for a real pair (SmolLM2's
tokenizer as the teacher's, GPT-2's as the student's) every prepared block's stored pieces equal what aligning it
on the fly gives, and so do the batch plans the loss and the eval read; the folder's key follows the teacher's
tokenizer; a batch from a Split names its rows, which is how the objective finds them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kd.config import load_config
from kd.cross_tokenizer.blocks import align_blocks, plan_batch
from kd.cross_tokenizer.report import special_ids
from kd.cross_tokenizer.stored import MARKER, groups_folder, groups_key, stored_groups, stored_rows
from kd.cross_tokenizer.vocab_files import load_tokenizer
from kd.data import IGNORE, open_prepared, prepare_data
from kd.data.prepared import SPLITS
from tests.cross_tokenizer_pairs import real_pair


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The smoke corpus prepared with GPT-2's tokenizer; both tokenizers saved as folders."""
    tmp = tmp_path_factory.mktemp("stored")
    pair = real_pair("gpt2")
    t_dir, s_dir = tmp / "teacher", tmp / "student"
    pair.teacher.save_pretrained(t_dir)
    pair.student.save_pretrained(s_dir)
    data = load_config("configs/smoke.yaml", [f"data.prepared_dir={tmp / 'prepared'}"]).data
    return pair, t_dir, s_dir, prepare_data(data, s_dir).path


def _equal(x, y) -> bool:
    if isinstance(x, list):  # a BatchPlan's per-row teacher sequences
        return len(x) == len(y) and all(map(_equal, x, y))
    return np.array_equal(np.asarray(x), np.asarray(y))


def _same(a, b) -> bool:
    return all(_equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))


def test_stored_groups_equal_on_the_fly(prepared):
    pair, t_dir, s_dir, root = prepared
    groups = stored_groups(root, pair, t_dir, s_dir)
    ps, specials = open_prepared(root), special_ids(pair.student)
    seen = 0
    for name in SPLITS:
        split = getattr(ps, name)
        assert len(groups[name]) == len(split) > 0
        for start in range(0, len(split), 16):
            b = split.batch(range(start, min(start + 16, len(split))))
            assert b.split == name and b.rows.tolist() == list(range(start, start + len(b.rows)))
            stored = stored_rows(groups, b)
            fly = align_blocks(pair, b.ids.numpy(), b.position_ids.numpy(), specials)
            assert [len(r) for r in stored] == [len(r) for r in fly]
            assert all(_same(x, y) for rs, rf in zip(stored, fly) for x, y in zip(rs, rf))
            args = (pair, b.ids.numpy(), b.position_ids.numpy(), b.labels.numpy(), specials, IGNORE)
            p_stored, p_fly = plan_batch(*args, segments=stored), plan_batch(*args)
            assert _same(p_stored, p_fly) and len(p_fly.t_ids) > 0
            seen += sum(len(r) for r in fly)
    assert seen > 10
    assert stored_groups(root, pair, t_dir, s_dir)["train"].folder == groups["train"].folder  # built once


def test_groups_key_follows_the_teacher_tokenizer(prepared, tmp_path):
    pair, t_dir, s_dir, root = prepared
    here = groups_folder(root, groups_key(root, t_dir, s_dir))
    other = tmp_path / "qwen2"
    load_tokenizer("qwen2").save_pretrained(other)
    assert groups_folder(root, groups_key(root, other, s_dir)) != here  # another teacher tokenizer: another folder
    assert groups_folder(root, groups_key(root, t_dir, s_dir)) == here
    stored_groups(root, pair, t_dir, s_dir)
    assert (here / MARKER).is_file() and here.parent.parent == open_prepared(root).root  # beside the prepared set


def test_a_rank_share_keeps_its_rows_and_split(prepared):
    """Distributed training slices each rank's rows out of the micro-batch: the rows go with the ids, the split's
    name stays whole, so each rank reads its own rows' stored pieces."""
    from kd.data import train_batch
    from kd.train.distributed.loop import rank_batch
    from kd.train.distributed.runtime import DistEnv

    pair, t_dir, s_dir, root = prepared
    groups = stored_groups(root, pair, t_dir, s_dir)
    train = open_prepared(root).train
    full = train_batch(train, step=1, micro=0, batch_size=4, grad_accum=1, seed=0)
    mine = rank_batch(train, step=1, micro=0, per_rank=2, grad_accum=1, seed=0, env=DistEnv(1, 2, 1, "cpu"))
    assert mine.split == "train" and mine.rows.tolist() == full.rows[2:].tolist()
    assert all(_same(x, y) for rs, rf in zip(stored_rows(groups, mine), stored_rows(groups, full)[2:])
               for x, y in zip(rs, rf))
