"""Delayed-feedback training of the conversion head: what is trained, when, and with what weight.

A click's label is known only when its conversion window closes: at the buy (label 1), or
``conversion_window_s`` (a day) of event time later (label 0). ``conversion_feedback`` says how
the online learner copes with that delay:

- ``wait`` (the behaviour before click samples existed): train a click once, when its window
  closes, with its true label. The CLICK sample (state/samples.py) is only predicted, never
  trained. For a day the head hears the positives of recent clicks and none of their negatives.

- ``fnw``: fake negatives with importance weights (Ktena, Tejani, Theis, Myana, Dilipkumar,
  Huszár, Yoo, Shi, "Addressing delayed feedback for continuous training with neural networks in
  CTR prediction", RecSys 2019, §3.2-3.3). Every click is trained at once, as a negative (its
  CLICK sample, label 0); a click that is bought is trained again, as a positive, when the buy
  arrives (its conversion sample, label 1); the window-end negative is not trained (the click
  was trained as a negative already). The two trainings of a bought click are distinct samples
  with distinct identities (the click's record, the buy's record), each trained once.

  With p(x) the true P(buy | x), the stream so built holds for each click one negative and, with
  probability p, one positive, so its label distribution is biased:

      b(y=1 | x) = p / (1 + p),        b(y=0 | x) = 1 / (1 + p).

  Importance sampling restores the expectation of the true log loss (the click density also
  changes by the factor 1 + p, which the weights absorb, Ktena et al. eq. 5-8):

      L = - Σ_{(x, y) ~ b} [ y · (1 + f(x)) · log f(x)
                             + (1 - y) · (1 - f(x)) · (1 + f(x)) · log(1 - f(x)) ]

  where f(x) stands in for p(x) in the weights and is not differentiated (stop-gradient). At
  f = p the expected gradient with respect to the logit vanishes:
  b1 · w1 · (p - 1) + b0 · w0 · p = p (p - 1) + (1 - p) p = 0, so the fixed point is the true
  probability and the model's outputs need no correction at serving (unlike FNC).

Chosen over ES-DFM and DEFER because it needs no second model (ES-DFM's elapsed-time model) and
no duplicated real negatives after the window (DEFER): the worker's CLICK sample is enough.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from tgastream.state.samples import CLICK, CONVERSION, Sample

FEEDBACK_MODES = ("wait", "fnw")


def check_mode(mode: str) -> str:
    if mode not in FEEDBACK_MODES:
        raise ValueError(f"conversion_feedback must be one of {', '.join(FEEDBACK_MODES)}, got {mode!r}")
    return mode


def training_samples(samples: Sequence[Sample], mode: str) -> list[Sample]:
    """The samples an optimizer step trains on, under feedback ``mode``: retrievals as they are;
    ``wait``: conversions with their labels, clicks not at all; ``fnw``: each click at once as a
    negative (a CONVERSION copy of its CLICK sample, same identity), bought conversions as
    positives, window-end negatives not at all."""
    out: list[Sample] = []
    for s in samples:
        if s.kind == CLICK:
            if mode == "fnw":
                out.append(dataclasses.replace(s, kind=CONVERSION, label=0.0))
        elif s.kind == CONVERSION and mode == "fnw":
            if s.label > 0.5:
                out.append(s)
        else:
            out.append(s)
    return out


def fnw_weights(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """FNW importance weights [C]: 1 + f for a positive, (1 - f)(1 + f) for a (fake) negative,
    f the model's P(buy) [C] taken as a constant (no gradient flows through the weights)."""
    f = probs.detach()
    return torch.where(labels > 0.5, 1.0 + f, (1.0 - f) * (1.0 + f))


def conversion_loss(logits: torch.Tensor, labels: torch.Tensor, mode: str = "wait") -> torch.Tensor:
    """Summed binary cross-entropy of the conversion rows (logits, labels [C]), FNW-weighted under
    ``fnw`` (the caller divides by the union's conversion count)."""
    labels = labels.to(logits.dtype)
    weight = fnw_weights(torch.sigmoid(logits), labels) if mode == "fnw" else None
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weight, reduction="sum")
