"""What a student learns from a micro-batch: one function per objective, each returning (loss sum, label tokens).

Rule: an objective is one entry of OBJECTIVES (and its name in TrainConfig's `objective.kind`). It gets the
DeepSpeed engine, a collated micro-batch (fcot.train.data.Collator: labels aligned with the inputs, HF style;
`weights` for a method's task weights; `kd_*` for the teacher's top-k) and the objective's config, and returns the
sum of its per-token losses and how many label tokens that sum is over; the trainer scales the sum by the global
batch's label tokens. `student_logprobs` is the forward pass they share: logits only where some row's next token is
a target (the vocabulary head and the loss skip the prompt).

kd: (1 - alpha) x cross-entropy + alpha x T^2 x KL(teacher || student) at the rationale tokens that carry the
teacher's top-k: the teacher's top k renormalized against the student's probabilities at those ids (the
default), or, with `tail`, the teacher's mass outside its top k as one more outcome and the student's mass
outside those k ids its counterpart: the KL of two distributions over k + 1 outcomes, exact when the teacher's
tail is one token, and never negative (verl's RFC 7856 found a truncated KL clamped to zero in most steps; here,
kd.py's 7.3M student with SmolLM2's top-20 gave no better held-out KL with the tail: off by default).

on_policy: the student's own samples, each token graded by the teacher (fcot.rollout, fcot.engines.Grade), at the
graded tokens only: `reverse_kl_sum` (the default) or GKD's `jsd_sum` over the teacher's top-k.
"""

from __future__ import annotations

import math

from fcot.train.data import IGNORE


def student_logprobs(engine, batch: dict, encoder_decoder: bool):
    """(log-softmax rows at the target positions, their logits, their labels, `keep`: for a decoder the columns of
    label positions kept, else None). Rows are flattened (row, position)."""
    import torch.nn.functional as F  # heavy: workers only

    labels = batch["labels"]
    if encoder_decoder:
        decoder_input_ids = engine.module.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=decoder_input_ids, use_cache=False).logits
        keep = None
    else:
        # A packed row carries position_ids and where each example starts, for fcot.train.attention.
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q",
                                        "max_length_q") if k in batch}
        labels = labels[:, 1:]
        keep = (labels != IGNORE).any(0).nonzero().squeeze(1)
        logits = engine(**inputs, use_cache=False, logits_to_keep=keep).logits
        labels = labels[:, keep]
    # cross_entropy is log_softmax then nll_loss: done apart, KD at T = 1 reads the same log-softmax.
    return F.log_softmax(logits.float(), -1).flatten(0, 1), logits, labels, keep


def cross_entropy_sum(logprobs, labels, batch: dict, keep, encoder_decoder: bool):
    """Sum of the label tokens' cross-entropies, each times its task's weight when the batch has `weights`."""
    import torch.nn.functional as F  # heavy: workers only

    if "weights" not in batch:
        return F.nll_loss(logprobs, labels.flatten(), ignore_index=IGNORE, reduction="sum")
    weights = batch["weights"] if encoder_decoder else batch["weights"][:, 1:][:, keep]
    return (F.nll_loss(logprobs, labels.flatten(), ignore_index=IGNORE, reduction="none") * weights.flatten()).sum()


def sft(engine, batch: dict, encoder_decoder: bool, objective=None):
    logprobs, _, labels, keep = student_logprobs(engine, batch, encoder_decoder)
    return cross_entropy_sum(logprobs, labels, batch, keep, encoder_decoder), (labels != IGNORE).sum()


def kd(engine, batch: dict, encoder_decoder: bool, objective):
    logprobs, logits, labels, keep = student_logprobs(engine, batch, encoder_decoder)
    ce = cross_entropy_sum(logprobs, labels, batch, keep, encoder_decoder)
    count = (labels != IGNORE).sum()
    if not len(batch.get("kd_at", ())):
        return (1 - objective.alpha) * ce, count
    at = _target_rows(batch, keep)
    ids, t, tail = batch["kd_ids"], objective.temperature, objective.tail
    if t == 1:  # k values per position, read in place: no copy of whole-vocabulary rows
        term = kl_sum(logprobs[at.unsqueeze(1), ids], batch["kd_logprobs"], t, tail)
    else:
        term = kd_sum(logits.flatten(0, 1)[at], ids, batch["kd_logprobs"], t, tail)
    return (1 - objective.alpha) * ce + objective.alpha * term, count


def on_policy(engine, batch: dict, encoder_decoder: bool, objective):
    """The student's own sampled tokens that the teacher graded (`kd_at`; fcot.rollout's rows: column 0 of `kd_ids`
    is the sampled token and of `kd_logprobs` the teacher's logprob of it, the other columns the teacher's top-k):
    the reverse KL's policy gradient, or GKD's JSD over the teacher's top-k. Only graded tokens count."""
    logprobs, _, _, keep = student_logprobs(engine, batch, encoder_decoder)
    count = batch["kd_at"].new_tensor(len(batch["kd_at"]))
    if not len(batch["kd_at"]):
        return logprobs.sum() * 0.0, count  # in the graph: every rank steps alike
    at, ids, teacher = _target_rows(batch, keep), batch["kd_ids"], batch["kd_logprobs"]
    if objective.divergence == "reverse_kl":
        return reverse_kl_sum(logprobs[at, ids[:, 0]], teacher[:, 0]), count
    return jsd_sum(logprobs[at.unsqueeze(1), ids[:, 1:]], teacher[:, 1:], objective.beta), count


def _target_rows(batch: dict, keep):
    """The rows of the flattened target-position log-softmax (`student_logprobs`) at the label positions `kd_at`:
    the label at (row, p) is predicted by the logits at p - 1, which sit in `keep`'s column of p - 1."""
    width = batch["labels"].shape[1]
    column = keep.new_full((width - 1,), -1)
    column[keep] = keep.new_tensor(range(len(keep)))
    return batch["kd_at"] // width * len(keep) + column[batch["kd_at"] % width - 1]


OBJECTIVES = {"sft": sft, "kd": kd, "on_policy": on_policy}


def loss_sum(engine, batch: dict, encoder_decoder: bool, objective=None):
    """(loss sum, label tokens) of a micro-batch under `objective` (a TrainConfig.objective; None: sft)."""
    return OBJECTIVES[objective.kind if objective is not None else "sft"](engine, batch, encoder_decoder, objective)


def kd_sum(student_logits, top_ids, top_logprobs, temperature: float, tail: bool = False):
    """KD's term from the student's logits at the target positions (one row per position): see kl_sum."""
    import torch  # heavy: workers only

    student = torch.log_softmax(student_logits.float() / temperature, -1).gather(-1, top_ids)
    return kl_sum(student, top_logprobs, temperature, tail)


def kl_sum(student, top_logprobs, temperature: float, tail: bool = False):
    """T^2 x the sum over positions of KL(p || q). `student`: the student's log-probabilities at temperature T at
    the teacher's top-k ids (of its whole vocabulary); `top_logprobs`: the teacher's raw log-softmax at those ids.
    With `tail`, p and q are over k + 1 outcomes, the last being everything outside the k ids (the teacher's
    tempered as one outcome); without, p is the teacher's top k renormalized at T."""
    import torch  # heavy: workers only

    top = top_logprobs.float()
    if tail:
        top = torch.cat([top, _log_rest(top)], -1)
        student = torch.cat([student, _log_rest(student)], -1)
    teacher = torch.log_softmax(top / temperature, -1)
    return temperature ** 2 * (teacher.exp() * (teacher - student)).sum()


def _log_rest(logprobs):
    """log(1 - sum(exp(logprobs))) over the last axis, kept finite (float16 logprobs may sum past 1)."""
    import torch  # heavy: workers only

    total = torch.logsumexp(logprobs, -1, keepdim=True).clamp(max=-1e-6)
    return torch.log(-torch.expm1(total)).clamp(min=-30.0)


def reverse_kl_sum(student, teacher):
    """On-policy distillation's loss at the student's own sampled tokens (Thinking Machines' "On-Policy
    Distillation", 2025): `student` and `teacher` are the two models' log-probabilities of each sampled token, the
    student's with its graph. Its value is the sum of the tokens' log-ratios, whose mean over samples from the
    student is the per-token KL(student || teacher); its gradient is the policy gradient with each token's own
    negative log-ratio as its advantage (a discount of zero: a token answers for itself, not for what follows),
    exact while the samples are the current student's."""
    ratio = (student - teacher).detach()
    return (ratio * (student - student.detach()) + ratio).sum()


def jsd_sum(student, top_logprobs, beta: float):
    """GKD's generalized Jensen-Shannon divergence (Agarwal et al., ICLR 2024), summed over positions, between the
    teacher's top k (`top_logprobs`, renormalized) and the student's probabilities at those ids (`student`,
    renormalized over them): beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q; beta 0 is
    KL(teacher || student) and beta 1 KL(student || teacher), exactly (as TRL's generalized_jsd_loss)."""
    import torch  # heavy: workers only

    p, q = torch.log_softmax(top_logprobs.float(), -1), torch.log_softmax(student, -1)
    if beta == 0:
        return (p.exp() * (p - q)).sum()
    if beta == 1:
        return (q.exp() * (q - p)).sum()
    m = torch.logsumexp(torch.stack([p + math.log(beta), q + math.log(1 - beta)]), 0)
    return (beta * p.exp() * (p - m) + (1 - beta) * q.exp() * (q - m)).sum()
