"""collate: right padding masked by position; batch_indices: a function of (seed, epoch), length-grouped."""

import torch
from sft_helpers import examples

from llm_sft import batch_indices, collate


def test_collate_pads_right_and_masks_padding():
    exs = examples((5, 3), prompt=2)
    b = collate(exs, pad_id=7)
    assert b.input_ids.tolist() == [exs[0].input_ids, exs[1].input_ids + [7, 7]]
    assert b.labels.tolist() == [
        exs[0].labels,
        exs[1].labels + [-100, -100],
    ]  # padding never trained on
    assert b.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert b.position_ids.tolist() == [list(range(5))] * 2
    assert (b.n_targets, b.n_tokens, len(b)) == (3 + 1, 8, 2)


def test_pad_id_equal_to_the_end_token_is_still_trained_where_it_is_a_label():
    ex = examples((4,), prompt=1)[0]
    end = ex.input_ids[-1]
    b = collate([ex, examples((2,), prompt=1)[0]], pad_id=end)  # pad id == end token id
    assert b.labels[0, -1] == end and b.labels[1, 2:].tolist() == [-100, -100]


def test_batch_indices_cover_everything_once_and_repeat_per_seed_and_epoch():
    lengths = torch.randint(1, 100, (103,), generator=torch.Generator().manual_seed(0)).tolist()
    a = batch_indices(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(103))
    assert [len(b) for b in a].count(8) == 12 and min(len(b) for b in a) == 7
    assert a == batch_indices(lengths, 8, seed=1, epoch=0)
    assert a != batch_indices(lengths, 8, seed=1, epoch=1) and a != batch_indices(lengths, 8, seed=2, epoch=0)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = batch_indices(lengths, 8, seed=1, group_by_length=False)
    assert padding(a) < padding(plain) / 4  # grouping by length saves most of the padding
    assert batch_indices(lengths, 8, shuffle=False, group_by_length=False)[0] == list(range(8))
