"""learners.masks: each mask on a hand-written batch, and their composition."""

import pytest
import torch

from learners.masks import (
    Segment,
    Source,
    accepted_mask,
    combine,
    completion_mask,
    judge_narrow,
    relevance_mask,
    special_token_mask,
    top_positions,
)

P, A, E, R, X = (
    Segment.PROMPT,
    Segment.ASSISTANT,
    Segment.ENVIRONMENT,
    Segment.TOOL,
    Segment.PADDING,
)  # R: tool result
SEGMENTS = torch.tensor([[P, P, A, A, E, A, A], [P, A, A, R, A, X, X]])


def rows(mask):
    return [[int(value) for value in row] for row in mask.tolist()]


def test_completion_mask_keeps_assistant_tokens_only():
    assert rows(completion_mask(SEGMENTS)) == [[0, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 1, 0, 0]]
    assert rows(completion_mask(SEGMENTS, trained=(A, R))) == [[0, 0, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 0, 0]]


def test_special_token_mask_drops_special_tokens_but_can_keep_end_of_turn():
    token_ids = torch.tensor([[1, 5, 6, 2, 0], [7, 2, 0, 0, 0]])  # 1 = <start>, 2 = <end>, 0 = padding
    assert rows(special_token_mask(token_ids, [0, 1, 2])) == [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert rows(special_token_mask(token_ids, [0, 1, 2], keep_ids=[2])) == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert special_token_mask(token_ids, []).all()


def test_relevance_mask_keeps_the_largest_disagreements_among_unmasked_positions():
    student = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0, -2.0]])
    teacher = torch.tensor([[-1.1, -4.0, -0.5, -9.0, -1.0], [-2.0, -3.0, -2.0, -2.0, -2.0]])
    # |T − S| = [0.1, 3.0, 0.5, 8.0, 0.0] and [0, 1, 0, 0, 0]; position 3 of row 0 is masked out
    mask = torch.tensor([[True, True, True, False, True], [False, True, False, False, False]])
    assert rows(relevance_mask(student, teacher, mask, top_t=2)) == [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]
    assert rows(relevance_mask(student, teacher, mask, top_t=10)) == rows(mask)  # fewer candidates than T
    assert not relevance_mask(student, teacher, mask, top_t=0).any()
    # ties go to the earlier position
    assert rows(top_positions(torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), 2)) == [[1, 1, 0, 0]]
    with pytest.raises(ValueError):
        top_positions(student, mask, -1)


def test_judge_narrow_keeps_only_judged_candidates():
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, False, False]])
    calls = []

    def judge(sequence, candidates):
        calls.append((sequence, candidates))
        return {0: [2, 1, 3], 2: []}[sequence]  # position 1 of row 0 is not a candidate: ignored

    narrowed = judge_narrow(mask, judge)
    assert calls == [(0, [0, 2, 3]), (2, [0, 1])]  # no call for a row without candidates
    assert rows(narrowed) == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_accepted_mask_keeps_student_proposed_tokens():
    sources = torch.tensor([[Source.STUDENT, Source.TEACHER, Source.STUDENT]])
    assert rows(accepted_mask(sources)) == [[1, 0, 1]]


def test_combine_is_an_and_of_same_shape_bool_masks():
    first = torch.tensor([[True, True, False, True]])
    second = torch.tensor([[True, False, False, True]])
    third = torch.tensor([[False, True, True, True]])
    assert rows(combine(first, second, third)) == [[0, 0, 0, 1]]
    assert combine(first) is first
    with pytest.raises(ValueError):
        combine()
    with pytest.raises(TypeError):
        combine(first, first.float())
    with pytest.raises(ValueError):
        combine(first, torch.ones(2, 4, dtype=torch.bool))


def test_masks_compose_into_a_training_mask():
    token_ids = torch.tensor([[1, 9, 5, 6, 8, 7, 2], [1, 5, 2, 8, 6, 0, 0]])
    sources = torch.tensor([[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    mask = combine(
        completion_mask(SEGMENTS),
        special_token_mask(token_ids, [0, 1, 2], keep_ids=[2]),
        accepted_mask(sources),
    )
    assert rows(mask) == [[0, 0, 1, 0, 0, 1, 1], [0, 1, 1, 0, 1, 0, 0]]
    student = torch.zeros(2, 7)
    teacher = -torch.arange(14, dtype=torch.float32).view(2, 7)  # disagreement grows with position
    assert rows(relevance_mask(student, teacher, mask, top_t=1)) == [
        [0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 1, 0, 0],
    ]
